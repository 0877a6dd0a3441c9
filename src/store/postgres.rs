use std::time::Duration;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Amount, Transaction};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, Lease, LeaseRequest, StoreError, StorePayment,
};
use crate::MilliSats;
use crate::channel::Channel;
use crate::channel::CheckedPayment;
use crate::wire::ChannelId;

const MIGRATION: &str = "
    SELECT pg_advisory_xact_lock(7305063461);
    CREATE TABLE IF NOT EXISTS paychan_channels (
        id TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        key_index BIGINT NOT NULL,
        state TEXT NOT NULL,
        best BYTEA,
        best_sat BIGINT NOT NULL,
        spent_msat BIGINT NOT NULL,
        expiry_is_time BOOLEAN NOT NULL,
        expiry BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS paychan_channels_state_expiry
        ON paychan_channels (state, expiry_is_time, expiry);
    CREATE SEQUENCE IF NOT EXISTS paychan_key_index MINVALUE 0 START 0;
    ALTER TABLE paychan_channels ADD COLUMN IF NOT EXISTS funded_at BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS paychan_idempotency (
        channel TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint BYTEA NOT NULL,
        response BYTEA,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (channel, key)
    );
    CREATE INDEX IF NOT EXISTS paychan_idempotency_expiry ON paychan_idempotency (expires_at);
    ALTER TABLE paychan_channels ADD COLUMN IF NOT EXISTS leased_msat BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE paychan_channels ADD COLUMN IF NOT EXISTS forfeited_msat BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS paychan_leases (
        channel TEXT NOT NULL,
        lease BIGINT NOT NULL,
        held_msat BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (channel, lease)
    );
    CREATE INDEX IF NOT EXISTS paychan_leases_expiry ON paychan_leases (expires_at);
";

/// Channels in PostgreSQL, shared by any number of API nodes.
///
/// Every operation is a single conditional statement (`UPDATE … WHERE … RETURNING`), atomic
/// in PostgreSQL: the best payment is replaced only by a better one and a debit happens only
/// if the balance covers it, whichever node runs it. A write is durable when the method
/// returns (the statement committed; with PostgreSQL's default `synchronous_commit = on` the
/// WAL is flushed). Server key indexes come from a sequence, so no two nodes ever derive the
/// same key. Tables (`paychan_channels`, sequence `paychan_key_index`) are created on connect
/// in the connection's `search_path`. A connection pool of 16 per node; an unreachable server
/// is reported as [`StoreError::Unavailable`] within 5 seconds, and the pool reconnects by
/// itself.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("status", &self.pool.status()).finish()
    }
}

fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::unavailable(error)
}

fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| unavailable("value exceeds PostgreSQL's BIGINT"))
}

fn msat(value: i64) -> MilliSats {
    MilliSats::from_msat(u64::try_from(value).unwrap_or(0))
}

const SELECT: &str = "SELECT channel, key_index, state, best, spent_msat, funded_at, leased_msat,
     forfeited_msat FROM paychan_channels";

fn decode(row: &tokio_postgres::Row) -> Result<ChannelRecord, StoreError> {
    let channel: Channel = serde_json::from_str(row.get::<_, &str>(0)).map_err(unavailable)?;
    let best: Option<Vec<u8>> = row.get(3);
    Ok(ChannelRecord {
        channel,
        key_index: u32::try_from(row.get::<_, i64>(1)).map_err(unavailable)?,
        state: ChannelState::from_name(row.get(2))?,
        best: best.map(|b| deserialize(&b)).transpose().map_err(unavailable)?,
        spent: msat(row.get(4)),
        leased: msat(row.get(6)),
        forfeited: msat(row.get(7)),
        funded_at: u32::try_from(row.get::<_, i64>(5)).map_err(unavailable)?,
    })
}

impl PostgresStore {
    /// Connects to `url` (for example `postgres://postgres@127.0.0.1:5432/paychan`) and
    /// creates the tables if they do not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the URL is invalid or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url.parse().map_err(unavailable)?).await
    }

    /// Connects with a driver configuration (for example to set `options` such as a
    /// `search_path`, or credentials from elsewhere).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the server cannot be reached or migrated.
    pub async fn connect_with(config: tokio_postgres::Config) -> Result<Self, StoreError> {
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(unavailable)?;
        let store = Self { pool };
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        tx.batch_execute(MIGRATION).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        client.query_opt(sql, params).await.map_err(unavailable)
    }

    /// The state and balance of a channel; `NotFound` if it does not exist.
    async fn state_and_balance(
        &self,
        id: &str,
    ) -> Result<(ChannelState, MilliSats, Amount), StoreError> {
        let row = self
            .query_opt(
                "SELECT state, best_sat * 1000 - spent_msat, best_sat FROM paychan_channels WHERE id = $1",
                &[&id],
            )
            .await?
            .ok_or(StoreError::NotFound)?;
        let best = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
        Ok((ChannelState::from_name(row.get(0))?, msat(row.get(1)), Amount::from_sat(best)))
    }

    /// Why [`DEBIT`] changed nothing, from a fresh read: the channel is not open, or its
    /// balance does not cover the amount.
    async fn refused(&self, id: &str) -> Result<Debit, StoreError> {
        let (state, balance, _) = self.state_and_balance(id).await?;
        Ok(if state == ChannelState::Open {
            Debit::Insufficient { balance }
        } else {
            Debit::NotOpen { state }
        })
    }
}

/// The debit, the one statement [`ChannelStore::debit`] and [`ChannelStore::debit_once`] run:
/// `$1` msat from channel `$2` if it is open and its balance (paid − spent − leased −
/// forfeited, [`Ledger`](crate::channel::Ledger)'s rule) covers them. Returns the unspent
/// balance after it, or no row when it changed nothing.
const DEBIT: &str = "UPDATE paychan_channels SET spent_msat = spent_msat + $1
     WHERE id = $2 AND state = 'open'
     AND best_sat * 1000 - spent_msat - leased_msat - forfeited_msat >= $1
     RETURNING best_sat * 1000 - spent_msat";

impl ChannelStore for PostgresStore {
    async fn create(&self, record: ChannelRecord) -> Result<(), StoreError> {
        let expiry = record.channel.params().expiry;
        let channel = serde_json::to_string(&record.channel).map_err(unavailable)?;
        let best = record.best.as_ref().map(serialize);
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO paychan_channels
                 (id, channel, key_index, state, best, best_sat, spent_msat, expiry_is_time, expiry, funded_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
                &[
                    &record.id().to_string(),
                    &channel,
                    &i64::from(record.key_index),
                    &record.state.as_str(),
                    &best,
                    &to_i64(record.paid_amount().to_sat())?,
                    &to_i64(record.spent.to_msat())?,
                    &expiry.is_block_time(),
                    &i64::from(expiry.to_consensus_u32()),
                    &i64::from(record.funded_at),
                ],
            )
            .await
            .map_err(unavailable)?;
        if inserted == 0 { Err(StoreError::AlreadyExists) } else { Ok(()) }
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>, StoreError> {
        let row = self.query_opt(&format!("{SELECT} WHERE id = $1"), &[&id.to_string()]).await?;
        row.as_ref().map(decode).transpose()
    }

    async fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> Result<StorePayment, StoreError> {
        let id = id.to_string();
        let offered = crate::channel::server_amount(&payment);
        let offered = to_i64(offered.to_sat())?;
        let row = self
            .query_opt(
                "UPDATE paychan_channels SET best = $1, best_sat = $2
                 WHERE id = $3 AND best_sat < $2 AND state = 'open'
                 RETURNING best_sat * 1000 - spent_msat",
                &[&serialize(&payment), &offered, &id],
            )
            .await?;
        match row {
            Some(row) => Ok(StorePayment::Stored { balance: msat(row.get(0)) }),
            None => Ok(StorePayment::Stale { best: self.state_and_balance(&id).await?.2 }),
        }
    }

    async fn close_with(&self, id: ChannelId, payment: CheckedPayment) -> Result<bool, StoreError> {
        let id = id.to_string();
        let offered = to_i64(payment.server_amount().to_sat())?;
        let row = self
            .query_opt(
                "UPDATE paychan_channels SET state = 'closing', best = $1, best_sat = $2
                 WHERE id = $3 AND state IN ('open', 'pending')
                 AND spent_msat + leased_msat + forfeited_msat <= $2::bigint * 1000
                 RETURNING 1",
                &[&payment.encoded().as_ref(), &offered, &id],
            )
            .await?;
        if row.is_none() {
            // `NotFound` for an unknown channel; otherwise it moved on or spent more.
            self.state_and_balance(&id).await?;
        }
        Ok(row.is_some())
    }

    async fn debit(&self, id: ChannelId, amount: MilliSats) -> Result<Debit, StoreError> {
        let id = id.to_string();
        let amount_sql = to_i64(amount.to_msat())?;
        match self.query_opt(DEBIT, &[&amount_sql, &id]).await? {
            Some(row) => Ok(Debit::Debited { balance: msat(row.get(0)) }),
            None => self.refused(&id).await,
        }
    }

    async fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> Result<Debit, StoreError> {
        let id = id.to_string();
        let offered = to_i64(payment.server_amount().to_sat())?;
        let payment = payment.into_encoded();
        let amount = to_i64(amount.to_msat())?;
        // One statement: the row is locked and read (`old`), then the better payment and
        // the debit are written together from that read. The balance the debit sees is the
        // one after the payment.
        let row = self
            .query_opt(
                "WITH old AS (
                     SELECT best_sat, spent_msat, leased_msat + forfeited_msat AS held
                     FROM paychan_channels WHERE id = $3 AND state = 'open' FOR UPDATE
                 ), next AS (
                     SELECT GREATEST(old.best_sat, $2) AS best_sat, old.spent_msat,
                            GREATEST(old.best_sat, $2) * 1000 - old.spent_msat - old.held
                                >= $4 AS covers
                     FROM old
                 )
                 UPDATE paychan_channels AS c SET
                     best = CASE WHEN $2 > c.best_sat THEN $1 ELSE c.best END,
                     best_sat = next.best_sat,
                     spent_msat = CASE WHEN next.covers THEN c.spent_msat + $4
                                       ELSE c.spent_msat END
                 FROM next WHERE c.id = $3
                 RETURNING next.covers, c.best_sat * 1000 - c.spent_msat",
                &[&payment, &offered, &id, &amount],
            )
            .await?;
        match row {
            Some(row) if row.get::<_, bool>(0) => Ok(Debit::Debited { balance: msat(row.get(1)) }),
            Some(row) => Ok(Debit::Insufficient { balance: msat(row.get(1)) }),
            // Not open (or gone): nothing was changed; report the state from a fresh read.
            None => Ok(Debit::NotOpen { state: self.state_and_balance(&id).await?.0 }),
        }
    }

    async fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> Result<DebitOnce, StoreError> {
        let id = id.to_string();
        let (now, expires_at) = (to_i64(claim.now)?, to_i64(claim.expires_at)?);
        let amount = to_i64(amount.to_msat())?;
        let mut client = self.client().await?;
        // One transaction: the claim (a row a concurrent claim waits on) and the debit commit
        // together, or neither does.
        let tx = client.transaction().await.map_err(unavailable)?;
        tx.execute(
            "DELETE FROM paychan_idempotency WHERE channel = $1 AND key = $2 AND expires_at <= $3",
            &[&id, &claim.key, &now],
        )
        .await
        .map_err(unavailable)?;
        let claimed = tx
            .query_opt(
                "INSERT INTO paychan_idempotency (channel, key, fingerprint, response, expires_at)
                 VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (channel, key) DO NOTHING RETURNING 1",
                &[&id, &claim.key, &claim.fingerprint.as_slice(), &expires_at],
            )
            .await
            .map_err(unavailable)?
            .is_some();
        if !claimed {
            let row = tx
                .query_one(
                    "SELECT fingerprint, response FROM paychan_idempotency
                     WHERE channel = $1 AND key = $2",
                    &[&id, &claim.key],
                )
                .await
                .map_err(unavailable)?;
            let fingerprint = <[u8; 32]>::try_from(row.get::<_, Vec<u8>>(0))
                .map_err(|_| unavailable("an idempotency fingerprint that is not 32 bytes"))?;
            return Ok(DebitOnce::Claimed(IdempotencyRecord::new(fingerprint, row.get(1))));
        }
        let debited = tx.query_opt(DEBIT, &[&amount, &id]).await.map_err(unavailable)?;
        let Some(row) = debited else {
            // Refused: the claim is rolled back with the transaction; report why (on another
            // connection: this one goes back to the pool first).
            drop(tx);
            drop(client);
            return self.refused(&id).await.map(DebitOnce::Debit);
        };
        // A few expired records go with every claim.
        tx.execute(
            "DELETE FROM paychan_idempotency WHERE ctid IN
             (SELECT ctid FROM paychan_idempotency WHERE expires_at <= $1
              LIMIT 16 FOR UPDATE SKIP LOCKED)",
            &[&now],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(DebitOnce::Debit(Debit::Debited { balance: msat(row.get(0)) }))
    }

    async fn finish_once(
        &self,
        id: ChannelId,
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        let (key, expires_at) = (&claim.key, to_i64(expires_at)?);
        // An unfinished claim's row expires when the claim lapses: that identifies the claim.
        let claimed = to_i64(claim.expires_at)?;
        let client = self.client().await?;
        match &response {
            Some(response) => {
                client
                    .execute(
                        "UPDATE paychan_idempotency SET response = $3, expires_at = $4
                         WHERE channel = $1 AND key = $2 AND response IS NULL
                           AND expires_at = $5",
                        &[&id, key, response, &expires_at, &claimed],
                    )
                    .await
            }
            None => {
                client
                    .execute(
                        "DELETE FROM paychan_idempotency
                         WHERE channel = $1 AND key = $2 AND response IS NULL
                           AND expires_at = $3",
                        &[&id, key, &claimed],
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        Ok(())
    }

    async fn credit(&self, id: ChannelId, amount: MilliSats) -> Result<MilliSats, StoreError> {
        let row = self
            .query_opt(
                "UPDATE paychan_channels SET spent_msat = GREATEST(spent_msat - $1, 0)
                 WHERE id = $2 RETURNING best_sat * 1000 - spent_msat",
                &[&to_i64(amount.to_msat())?, &id.to_string()],
            )
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(msat(row.get(0)))
    }

    async fn lease(&self, id: ChannelId, request: LeaseRequest) -> Result<Lease, StoreError> {
        let id = id.to_string();
        let mut client = self.client().await?;
        // One transaction, the channel's row locked first (as every statement on it does).
        let tx = client.transaction().await.map_err(unavailable)?;
        let lock = "SELECT state, best_sat * 1000, spent_msat, leased_msat + forfeited_msat
                    FROM paychan_channels WHERE id = $1 FOR UPDATE";
        tx.query_opt(lock, &[&id]).await.map_err(unavailable)?.ok_or(StoreError::NotFound)?;
        if let Some((lease, used)) = request.settle {
            let used = to_i64(used.to_msat())?;
            tx.execute(
                "WITH gone AS (
                     DELETE FROM paychan_leases WHERE channel = $1 AND lease = $2
                     RETURNING held_msat
                 )
                 UPDATE paychan_channels SET leased_msat = GREATEST(leased_msat - gone.held_msat, 0),
                     spent_msat = spent_msat + LEAST($3, gone.held_msat)
                 FROM gone WHERE id = $1",
                &[&id, &lease.get().cast_signed(), &used],
            )
            .await
            .map_err(unavailable)?;
        }
        let row = tx.query_one(lock, &[&id]).await.map_err(unavailable)?;
        let state = ChannelState::from_name(row.get(0))?;
        let (paid, spent, held) = (msat(row.get(1)), msat(row.get(2)), msat(row.get(3)));
        let balance = paid.saturating_sub(spent).saturating_sub(held);
        let granted = |amount| Lease::Granted { amount, paid, spent };
        let outcome = match request.take {
            None => granted(MilliSats::ZERO),
            Some(_) if state != ChannelState::Open => Lease::NotOpen { state },
            Some(take) => match take.grant(balance) {
                None => Lease::Insufficient { balance },
                Some(amount) => {
                    let held = to_i64(amount.to_msat())?;
                    tx.execute(
                        "INSERT INTO paychan_leases (channel, lease, held_msat, expires_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (channel, lease) DO UPDATE
                         SET held_msat = paychan_leases.held_msat + excluded.held_msat,
                             expires_at = excluded.expires_at",
                        &[&id, &take.id.get().cast_signed(), &held, &to_i64(take.expires_at)?],
                    )
                    .await
                    .map_err(unavailable)?;
                    tx.execute(
                        "UPDATE paychan_channels SET leased_msat = leased_msat + $1 WHERE id = $2",
                        &[&held, &id],
                    )
                    .await
                    .map_err(unavailable)?;
                    granted(amount)
                }
            },
        };
        tx.commit().await.map_err(unavailable)?;
        Ok(outcome)
    }

    async fn expire_leases(&self, now: u64) -> Result<MilliSats, StoreError> {
        let now = to_i64(now)?;
        let client = self.client().await?;
        let channels = client
            .query(
                "SELECT DISTINCT channel FROM paychan_leases WHERE expires_at <= $1 LIMIT 1000",
                &[&now],
            )
            .await
            .map_err(unavailable)?;
        drop(client);
        let mut forfeited = MilliSats::ZERO;
        for row in channels {
            let id: String = row.get(0);
            let mut client = self.client().await?;
            // Channel first, then its leases: the order every lease operation locks in.
            let tx = client.transaction().await.map_err(unavailable)?;
            tx.execute("SELECT 1 FROM paychan_channels WHERE id = $1 FOR UPDATE", &[&id])
                .await
                .map_err(unavailable)?;
            let held = tx
                .query_opt(
                    "WITH gone AS (
                         DELETE FROM paychan_leases WHERE channel = $1 AND expires_at <= $2
                         RETURNING held_msat
                     ), total AS (SELECT COALESCE(SUM(held_msat), 0)::bigint AS held FROM gone)
                     UPDATE paychan_channels SET leased_msat = GREATEST(leased_msat - total.held, 0),
                         forfeited_msat = forfeited_msat + total.held
                     FROM total WHERE id = $1 RETURNING total.held",
                    &[&id, &now],
                )
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            if let Some(held) = held {
                forfeited = forfeited.saturating_add(msat(held.get(0)));
            }
        }
        Ok(forfeited)
    }

    async fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> Result<bool, StoreError> {
        super::legal_move(from, to)?;
        let id = id.to_string();
        let row = self
            .query_opt(
                "UPDATE paychan_channels SET state = $1 WHERE id = $2 AND state = $3 RETURNING id",
                &[&to.as_str(), &id, &from.as_str()],
            )
            .await?;
        if row.is_some() {
            return Ok(true);
        }
        self.state_and_balance(&id).await?;
        Ok(false)
    }

    async fn next_key_index(&self) -> Result<u32, StoreError> {
        let row = self
            .query_opt("SELECT nextval('paychan_key_index')", &[])
            .await?
            .ok_or_else(|| unavailable("nextval returned nothing"))?;
        super::key_index(u64::try_from(row.get::<_, i64>(0)).map_err(unavailable)?)
    }

    async fn list(&self, state: ChannelState) -> Result<Vec<ChannelRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("{SELECT} WHERE state = $1 ORDER BY expiry_is_time, expiry"),
                &[&state.as_str()],
            )
            .await
            .map_err(unavailable)?;
        rows.iter().map(decode).collect()
    }

    async fn count(&self, state: ChannelState) -> Result<usize, StoreError> {
        let row = self
            .query_opt("SELECT COUNT(*) FROM paychan_channels WHERE state = $1", &[&state.as_str()])
            .await?
            .ok_or_else(|| unavailable("COUNT returned no row"))?;
        usize::try_from(row.get::<_, i64>(0)).map_err(unavailable)
    }
}
