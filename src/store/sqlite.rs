use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Amount, Transaction};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, Lease, LeaseRequest, StoreError, StorePayment,
};
use crate::MilliSats;
use crate::channel::Channel;
use crate::channel::CheckedPayment;
use crate::wire::ChannelId;

const MIGRATIONS: &[&str] = &[
    // 1: channels and the key index counter.
    "CREATE TABLE channels (
        id TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        key_index INTEGER NOT NULL,
        state TEXT NOT NULL,
        best BLOB,
        best_sat INTEGER NOT NULL,
        spent_msat INTEGER NOT NULL,
        expiry_is_time INTEGER NOT NULL,
        expiry INTEGER NOT NULL
    );
    CREATE INDEX channels_state_expiry ON channels (state, expiry_is_time, expiry);
    CREATE TABLE key_index (next INTEGER NOT NULL);
    INSERT INTO key_index (next) VALUES (0);",
    // 2: the height the funding was broadcast at.
    "ALTER TABLE channels ADD COLUMN funded_at INTEGER NOT NULL DEFAULT 0;",
    // 3: idempotency keys, with the response of the request that claimed each.
    "CREATE TABLE idempotency (
        channel TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        response BLOB,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (channel, key)
    );
    CREATE INDEX idempotency_expiry ON idempotency (expires_at);",
    // 4: leases (see `Leased`): what nodes hold of each channel's balance.
    "ALTER TABLE channels ADD COLUMN leased_msat INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE channels ADD COLUMN forfeited_msat INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE leases (
        channel TEXT NOT NULL,
        lease INTEGER NOT NULL,
        held_msat INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (channel, lease)
    );
    CREATE INDEX leases_expiry ON leases (expires_at);",
];

/// The durable store for one node: channels in a SQLite database file.
///
/// The database runs in WAL mode with `synchronous = FULL`: **a write is durable when the
/// method returns** — its transaction committed and the WAL was fsynced — so a payment the
/// server acknowledged survives a crash or power loss of the process and the machine. Every
/// method is one `BEGIN IMMEDIATE` transaction, so operations on a channel are atomic and
/// serialised, also across processes sharing the file (one node; for several nodes use
/// PostgreSQL or Redis). Calls run on tokio's blocking pool. The schema is migrated on open.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), paychan::store::StoreError> {
/// use paychan::store::{ChannelStore, SqliteStore};
///
/// let dir = std::env::temp_dir().join(format!("paychan-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let store = SqliteStore::open(dir.join("channels.sqlite3"))?;
/// assert!(store.next_key_index().await? < 1 << 31);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::unavailable(error)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the file cannot be opened or migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::with(Connection::open(path).map_err(unavailable)?)
    }

    /// Opens a private in-memory database (not durable: for tests).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if SQLite cannot allocate it.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::with(Connection::open_in_memory().map_err(unavailable)?)
    }

    fn with(mut connection: Connection) -> Result<Self, StoreError> {
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
            )
            .map_err(unavailable)?;
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        let version: i64 =
            tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(unavailable)?;
        let version = usize::try_from(version).map_err(unavailable)?;
        if version > MIGRATIONS.len() {
            return Err(unavailable(format!(
                "database schema {version} is newer than this paychan"
            )));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(migration).map_err(unavailable)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
                .map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(Self { connection: Arc::new(Mutex::new(connection)) })
    }

    /// Runs `f` in one immediate transaction on the blocking pool, committing on `Ok`.
    fn run<T, F>(&self, f: F) -> impl Future<Output = Result<T, StoreError>> + Send + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let connection = self.connection.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut connection = connection.lock().unwrap_or_else(|p| p.into_inner());
                let tx = connection
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(unavailable)?;
                let value = f(&tx)?;
                tx.commit().map_err(unavailable)?;
                Ok(value)
            })
            .await
            .map_err(unavailable)?
        }
    }
}

fn msat(value: i64) -> MilliSats {
    MilliSats::from_msat(u64::try_from(value).unwrap_or(0))
}

fn sql_u64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| unavailable("value exceeds SQLite's integer range"))
}

const SELECT: &str = "SELECT channel, key_index, state, best, spent_msat, funded_at, leased_msat,
     forfeited_msat FROM channels";

/// A `channels` row as stored: channel JSON, key index, state, best payment, spent msat,
/// funding height, leased msat, forfeited msat.
type Row = (String, i64, String, Option<Vec<u8>>, i64, i64, i64, i64);

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}

fn decode_record(
    (channel, key_index, state, best, spent, funded_at, leased, forfeited): Row,
) -> Result<ChannelRecord, StoreError> {
    let channel: Channel = serde_json::from_str(&channel).map_err(unavailable)?;
    let best: Option<Transaction> =
        best.map(|bytes| deserialize(&bytes)).transpose().map_err(unavailable)?;
    Ok(ChannelRecord {
        channel,
        key_index: u32::try_from(key_index).map_err(unavailable)?,
        state: ChannelState::from_name(&state)?,
        best,
        spent: msat(spent),
        leased: msat(leased),
        forfeited: msat(forfeited),
        funded_at: u32::try_from(funded_at).map_err(unavailable)?,
    })
}

/// A channel's state and money as read inside a transaction.
struct Money {
    state: ChannelState,
    /// paid − spent.
    unspent: MilliSats,
    /// leased + forfeited.
    held: MilliSats,
    spent: MilliSats,
    best: Amount,
}

impl Money {
    /// paid − spent − leased − forfeited.
    fn balance(&self) -> MilliSats {
        self.unspent.saturating_sub(self.held)
    }

    fn paid(&self) -> MilliSats {
        MilliSats::from_sat(self.best).unwrap_or(MilliSats::MAX)
    }
}

/// Reads the state and money of a channel inside `tx`; `NotFound` if it does not exist.
fn money(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Money, StoreError> {
    let row: Option<(String, i64, i64, i64, i64)> = tx
        .query_row(
            "SELECT state, best_sat * 1000 - spent_msat, leased_msat + forfeited_msat, best_sat,
             spent_msat FROM channels WHERE id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
        )
        .optional()
        .map_err(unavailable)?;
    let (state, unspent, held, best, spent) = row.ok_or(StoreError::NotFound)?;
    Ok(Money {
        state: ChannelState::from_name(&state)?,
        unspent: msat(unspent),
        held: msat(held),
        spent: msat(spent),
        best: Amount::from_sat(u64::try_from(best).unwrap_or(0)),
    })
}

impl ChannelStore for SqliteStore {
    fn create(&self, record: ChannelRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.run(move |tx| {
            let expiry = record.channel.params().expiry;
            let inserted = tx
                .execute(
                    "INSERT INTO channels (id, channel, key_index, state, best, best_sat, spent_msat, expiry_is_time, expiry, funded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id) DO NOTHING",
                    params![
                        record.id().to_string(),
                        serde_json::to_string(&record.channel).map_err(unavailable)?,
                        record.key_index,
                        record.state.as_str(),
                        record.best.as_ref().map(serialize),
                        sql_u64(record.paid_amount().to_sat())?,
                        sql_u64(record.spent.to_msat())?,
                        expiry.is_block_time(),
                        expiry.to_consensus_u32(),
                        record.funded_at,
                    ],
                )
                .map_err(unavailable)?;
            if inserted == 0 { Err(StoreError::AlreadyExists) } else { Ok(()) }
        })
    }

    fn load(
        &self,
        id: ChannelId,
    ) -> impl Future<Output = Result<Option<ChannelRecord>, StoreError>> + Send {
        self.run(move |tx| {
            let row = tx
                .query_row(&format!("{SELECT} WHERE id = ?1"), [id.to_string()], record_from_row)
                .optional()
                .map_err(unavailable)?;
            row.map(decode_record).transpose()
        })
    }

    fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> impl Future<Output = Result<StorePayment, StoreError>> + Send {
        self.run(move |tx| {
            let paid = crate::channel::server_amount(&payment);
            store_payment(tx, &id.to_string(), paid, &serialize(&payment))
        })
    }

    fn debit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        self.run(move |tx| debit(tx, &id.to_string(), amount))
    }

    fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        self.run(move |tx| {
            let id = id.to_string();
            let paid = payment.server_amount();
            let _stored_or_stale = store_payment(tx, &id, paid, &payment.encoded())?;
            debit(tx, &id, amount)
        })
    }

    fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> impl Future<Output = Result<DebitOnce, StoreError>> + Send {
        let claim = claim.clone();
        self.run(move |tx| {
            let id = id.to_string();
            let now = sql_u64(claim.now)?;
            let held = tx
                .query_row(
                    "SELECT fingerprint, response FROM idempotency
                     WHERE channel = ?1 AND key = ?2 AND expires_at > ?3",
                    params![id, claim.key, now],
                    |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Option<Vec<u8>>>(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            if let Some((fingerprint, response)) = held {
                let fingerprint = <[u8; 32]>::try_from(fingerprint)
                    .map_err(|_| unavailable("an idempotency fingerprint that is not 32 bytes"))?;
                return Ok(DebitOnce::Claimed(IdempotencyRecord::new(fingerprint, response)));
            }
            let debit = debit(tx, &id, amount)?;
            if matches!(debit, Debit::Debited { .. }) {
                // A few expired records go with every claim.
                tx.execute(
                    "DELETE FROM idempotency WHERE rowid IN
                     (SELECT rowid FROM idempotency WHERE expires_at <= ?1 LIMIT 16)",
                    params![now],
                )
                .map_err(unavailable)?;
                tx.execute(
                    "INSERT OR REPLACE INTO idempotency
                     (channel, key, fingerprint, response, expires_at)
                     VALUES (?1, ?2, ?3, NULL, ?4)",
                    params![
                        id,
                        claim.key,
                        claim.fingerprint.as_slice(),
                        sql_u64(claim.expires_at)?
                    ],
                )
                .map_err(unavailable)?;
            }
            Ok(DebitOnce::Debit(debit))
        })
    }

    fn finish_once(
        &self,
        id: ChannelId,
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        // An unfinished claim's row expires when the claim lapses: that identifies the claim.
        let (key, claimed) = (claim.key.clone(), claim.expires_at);
        self.run(move |tx| {
            let id = id.to_string();
            let claimed = sql_u64(claimed)?;
            match response {
                Some(response) => tx.execute(
                    "UPDATE idempotency SET response = ?3, expires_at = ?4
                     WHERE channel = ?1 AND key = ?2 AND response IS NULL AND expires_at = ?5",
                    params![id, key, response, sql_u64(expires_at)?, claimed],
                ),
                None => tx.execute(
                    "DELETE FROM idempotency
                     WHERE channel = ?1 AND key = ?2 AND response IS NULL AND expires_at = ?3",
                    params![id, key, claimed],
                ),
            }
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn close_with(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.run(move |tx| {
            let id = id.to_string();
            let offered = sql_u64(payment.server_amount().to_sat())?;
            let updated = tx
                .execute(
                    "UPDATE channels SET state = 'closing', best = ?1, best_sat = ?2
                     WHERE id = ?3 AND state IN ('open', 'pending')
                     AND spent_msat + leased_msat + forfeited_msat <= ?2 * 1000",
                    params![payment.encoded().as_ref(), offered, id],
                )
                .map_err(unavailable)?;
            if updated == 0 {
                // `NotFound` for an unknown channel; otherwise it moved on or spent more.
                money(tx, &id)?;
            }
            Ok(updated == 1)
        })
    }

    fn credit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        self.run(move |tx| {
            let id = id.to_string();
            money(tx, &id)?;
            tx.execute(
                "UPDATE channels SET spent_msat = MAX(spent_msat - ?1, 0) WHERE id = ?2",
                params![sql_u64(amount.to_msat())?, id],
            )
            .map_err(unavailable)?;
            Ok(money(tx, &id)?.unspent)
        })
    }

    fn lease(
        &self,
        id: ChannelId,
        request: LeaseRequest,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send {
        self.run(move |tx| {
            let id = id.to_string();
            money(tx, &id)?;
            if let Some((lease, used)) = request.settle {
                let held: Option<i64> = tx
                    .query_row(
                        "DELETE FROM leases WHERE channel = ?1 AND lease = ?2 RETURNING held_msat",
                        params![id, lease.get().cast_signed()],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(unavailable)?;
                if let Some(held) = held {
                    let used = sql_u64(used.to_msat())?.min(held);
                    tx.execute(
                        "UPDATE channels SET leased_msat = MAX(leased_msat - ?1, 0),
                         spent_msat = spent_msat + ?2 WHERE id = ?3",
                        params![held, used, id],
                    )
                    .map_err(unavailable)?;
                }
            }
            let money = money(tx, &id)?;
            let granted =
                |amount| Lease::Granted { amount, paid: money.paid(), spent: money.spent };
            let Some(take) = request.take else { return Ok(granted(MilliSats::ZERO)) };
            if money.state != ChannelState::Open {
                return Ok(Lease::NotOpen { state: money.state });
            }
            let Some(amount) = take.grant(money.balance()) else {
                return Ok(Lease::Insufficient { balance: money.balance() });
            };
            let held = sql_u64(amount.to_msat())?;
            tx.execute(
                "INSERT INTO leases (channel, lease, held_msat, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (channel, lease) DO UPDATE
                 SET held_msat = held_msat + excluded.held_msat, expires_at = excluded.expires_at",
                params![id, take.id.get().cast_signed(), held, sql_u64(take.expires_at)?],
            )
            .map_err(unavailable)?;
            tx.execute(
                "UPDATE channels SET leased_msat = leased_msat + ?1 WHERE id = ?2",
                params![held, id],
            )
            .map_err(unavailable)?;
            Ok(granted(amount))
        })
    }

    fn expire_leases(
        &self,
        now: u64,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        self.run(move |tx| {
            let now = sql_u64(now)?;
            let mut statement = tx
                .prepare("DELETE FROM leases WHERE expires_at <= ?1 RETURNING channel, held_msat")
                .map_err(unavailable)?;
            let lapsed: Vec<(String, i64)> = statement
                .query_map([now], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            let mut forfeited = MilliSats::ZERO;
            for (channel, held) in lapsed {
                tx.execute(
                    "UPDATE channels SET leased_msat = MAX(leased_msat - ?1, 0),
                     forfeited_msat = forfeited_msat + ?1 WHERE id = ?2",
                    params![held, channel],
                )
                .map_err(unavailable)?;
                forfeited = forfeited.saturating_add(msat(held));
            }
            Ok(forfeited)
        })
    }

    fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let legal = super::legal_move(from, to);
        self.run(move |tx| {
            legal?;
            let id = id.to_string();
            money(tx, &id)?;
            let updated = tx
                .execute(
                    "UPDATE channels SET state = ?1 WHERE id = ?2 AND state = ?3",
                    params![to.as_str(), id, from.as_str()],
                )
                .map_err(unavailable)?;
            Ok(updated == 1)
        })
    }

    fn next_key_index(&self) -> impl Future<Output = Result<u32, StoreError>> + Send {
        self.run(|tx| {
            let index: i64 = tx
                .query_row("UPDATE key_index SET next = next + 1 RETURNING next - 1", [], |row| {
                    row.get(0)
                })
                .map_err(unavailable)?;
            super::key_index(u64::try_from(index).map_err(unavailable)?)
        })
    }

    fn list(
        &self,
        state: ChannelState,
    ) -> impl Future<Output = Result<Vec<ChannelRecord>, StoreError>> + Send {
        self.run(move |tx| {
            let mut statement = tx
                .prepare(&format!("{SELECT} WHERE state = ?1 ORDER BY expiry_is_time, expiry"))
                .map_err(unavailable)?;
            let rows =
                statement.query_map([state.as_str()], record_from_row).map_err(unavailable)?;
            rows.map(|row| decode_record(row.map_err(unavailable)?)).collect()
        })
    }

    fn count(&self, state: ChannelState) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.run(move |tx| {
            let count: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM channels WHERE state = ?1",
                    [state.as_str()],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
            usize::try_from(count).map_err(unavailable)
        })
    }
}

/// Makes `payment` the best of channel `id` if it is open and the payment pays more.
fn store_payment(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    paid: bitcoin::Amount,
    encoded: &[u8],
) -> Result<StorePayment, StoreError> {
    let offered = sql_u64(paid.to_sat())?;
    let updated = tx
        .execute(
            "UPDATE channels SET best = ?1, best_sat = ?2
             WHERE id = ?3 AND best_sat < ?2 AND state = 'open'",
            params![encoded, offered, id],
        )
        .map_err(unavailable)?;
    let money = money(tx, id)?;
    Ok(if updated == 1 {
        StorePayment::Stored { balance: money.unspent }
    } else {
        StorePayment::Stale { best: money.best }
    })
}

/// Debits `amount` from channel `id` if it is open and its balance covers it.
fn debit(tx: &rusqlite::Transaction<'_>, id: &str, amount: MilliSats) -> Result<Debit, StoreError> {
    let money = money(tx, id)?;
    if money.state != ChannelState::Open {
        return Ok(Debit::NotOpen { state: money.state });
    }
    if money.balance() < amount {
        return Ok(Debit::Insufficient { balance: money.unspent });
    }
    tx.execute(
        "UPDATE channels SET spent_msat = spent_msat + ?1 WHERE id = ?2",
        params![sql_u64(amount.to_msat())?, id],
    )
    .map_err(unavailable)?;
    Ok(Debit::Debited { balance: money.unspent.saturating_sub(amount) })
}

#[cfg(test)]
mod tests {
    use bitcoin::secp256k1::SecretKey;
    use bitcoin::{CompressedPublicKey, FeeRate, OutPoint, ScriptBuf, absolute::LockTime};

    use super::*;
    use crate::channel::ChannelParams;

    fn key(byte: u8) -> CompressedPublicKey {
        let secret = SecretKey::from_slice(&[byte; 32]).expect("valid key");
        crate::channel::sig::public_key(&secret)
    }

    #[tokio::test]
    async fn a_version_1_database_is_migrated_and_keeps_its_channels() {
        let dir = std::env::temp_dir().join(format!("paychan-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v1.sqlite3");
        let params = ChannelParams {
            client_key: key(1),
            server_key: key(2),
            value: Amount::from_sat(100_000),
            expiry: LockTime::from_height(1_000).unwrap(),
            client_script: ScriptBuf::new_p2wpkh(&key(1).wpubkey_hash()),
            server_script: ScriptBuf::new_p2wpkh(&key(2).wpubkey_hash()),
            min_fee_rate: FeeRate::from_sat_per_vb_u32(2),
            max_fee_rate: FeeRate::from_sat_per_vb_u32(100),
            close_margin: 36,
        };
        let channel = params.at(OutPoint::default());
        {
            // A database written by the first schema, with one channel.
            let connection = Connection::open(&path).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.execute_batch("PRAGMA user_version = 1").unwrap();
            connection
                .execute(
                    "INSERT INTO channels (id, channel, key_index, state, best, best_sat, spent_msat, expiry_is_time, expiry)
                     VALUES (?1, ?2, 3, 'open', NULL, 0, 5000, 0, 1000)",
                    params![
                        ChannelId::new(channel.outpoint()).to_string(),
                        serde_json::to_string(&channel).unwrap()
                    ],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let record = store.load(ChannelId::new(channel.outpoint())).await.unwrap().unwrap();
        assert_eq!(record.channel, channel);
        assert_eq!((record.key_index, record.state), (3, ChannelState::Open));
        assert_eq!(record.spent, MilliSats::from_msat(5_000));
        assert_eq!(record.funded_at, 0, "unknown for channels older than the field");
        let version: i64 = store
            .connection
            .lock()
            .unwrap()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
