//! Every store backend for tests: each backend's test fixture.

/// A fresh database path under the system's temporary directory.
#[cfg(feature = "sqlite")]
pub fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("paychan-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("channels.sqlite3")
}

/// A PostgreSQL configuration whose `search_path` is a fresh schema, so every run starts empty;
/// `None` (after printing "skipped: …") when `PAYCHAN_TEST_POSTGRES_URL` is not set.
#[cfg(feature = "postgres")]
pub async fn postgres_config(name: &str) -> Option<paychan::store::tokio_postgres::Config> {
    use paychan::store::tokio_postgres;
    let Ok(url) = std::env::var("PAYCHAN_TEST_POSTGRES_URL") else {
        println!("skipped: PAYCHAN_TEST_POSTGRES_URL is not set");
        return None;
    };
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let schema = format!("paychan_test_{name}_{}_{nanos}", std::process::id());
    let mut config: tokio_postgres::Config =
        url.parse().expect("a valid PAYCHAN_TEST_POSTGRES_URL");
    let (client, connection) =
        config.connect(tokio_postgres::NoTls).await.expect("PostgreSQL is reachable");
    tokio::spawn(connection);
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    config.options(format!("-c search_path={schema}"));
    Some(config)
}

/// A Redis store under a key prefix of its own; `None` (after printing "skipped: …") when
/// `PAYCHAN_TEST_REDIS_URL` is not set.
#[cfg(feature = "redis")]
pub async fn redis_store(name: &str) -> Option<paychan::store::RedisStore> {
    let Ok(url) = std::env::var("PAYCHAN_TEST_REDIS_URL") else {
        println!("skipped: PAYCHAN_TEST_REDIS_URL is not set");
        return None;
    };
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let store = paychan::store::RedisStore::connect(&url).await.expect("Redis is reachable");
    Some(store.with_prefix(format!("{{paychan-test-{name}-{}-{nanos}}}:", std::process::id())))
}

/// One test per built-in backend: `for_each_store!(name, run)` defines a module `name` with
/// tests `memory`, `sqlite`, `postgres` and `redis` (each behind its feature), which call the
/// async fn `run` with a fresh store of that backend. The store matrix, written once.
#[macro_export]
macro_rules! for_each_store {
    ($name:ident, $run:path) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                $run(paychan::store::MemoryStore::new()).await;
            }

            #[cfg(feature = "sqlite")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let path = $crate::common::stores::temp_db(stringify!($name));
                $run(paychan::store::SqliteStore::open(path).unwrap()).await;
            }

            #[cfg(feature = "postgres")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let name = stringify!($name);
                let Some(config) = $crate::common::stores::postgres_config(name).await else {
                    return;
                };
                $run(paychan::store::PostgresStore::connect_with(config).await.unwrap()).await;
            }

            #[cfg(feature = "redis")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                let name = stringify!($name);
                let Some(store) = $crate::common::stores::redis_store(name).await else { return };
                $run(store).await;
            }
        }
    };
}
