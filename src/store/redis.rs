use std::time::Duration;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Amount, Transaction};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, Lease, LeaseRequest, StoreError, StorePayment,
};
use crate::MilliSats;
use crate::channel::Channel;
use crate::channel::CheckedPayment;
use crate::wire::ChannelId;

/// The default key prefix. Its `{…}` hash tag puts every key of a deployment in one Redis
/// Cluster slot, which the multi-key scripts require.
pub const DEFAULT_PREFIX: &str = "{paychan}:";

/// `prefix` if it holds a Redis Cluster hash tag (its first `{` followed, later, by a `}`
/// with at least one character between), else `prefix` wrapped in one: `{prefix}`, without
/// any braces it had (`{paychan}` for an empty prefix).
fn hash_tagged(prefix: String) -> String {
    let tagged = prefix
        .find('{')
        .and_then(|open| prefix[open + 1..].find('}'))
        .is_some_and(|close| close > 0);
    if tagged {
        return prefix;
    }
    let bare: String = prefix.chars().filter(|c| !matches!(c, '{' | '}')).collect();
    if bare.is_empty() { "{paychan}".to_owned() } else { format!("{{{bare}}}") }
}

/// The largest channel value the Redis store accepts: Lua computes balances in doubles, exact
/// up to 2^53 msat (about 90 000 BTC).
pub const MAX_CHANNEL_SAT: u64 = (1 << 53) / 1_000;

const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'channel', ARGV[2], 'key_index', ARGV[3], 'state', ARGV[4],
  'best', ARGV[5], 'best_sat', ARGV[6], 'spent_msat', ARGV[7], 'score', ARGV[8],
  'funded_at', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
return 1";

const STORE_PAYMENT: &str = r"
local h = redis.call('HMGET', KEYS[1], 'best_sat', 'spent_msat', 'state')
if not h[1] then return {-1, '0'} end
if tonumber(h[1]) >= tonumber(ARGV[2]) or h[3] ~= 'open' then return {0, h[1]} end
redis.call('HSET', KEYS[1], 'best', ARGV[1], 'best_sat', ARGV[2])
return {1, string.format('%.0f', tonumber(ARGV[2]) * 1000 - tonumber(h[2]))}";

/// The debit, written once and prepended to the scripts that debit: `channel(key)` reads a
/// channel's state and ledger (nil when it does not exist); `debit(key, h, paid_sat, amount)`
/// debits `amount` msat if the balance (paid − spent − leased − forfeited,
/// [`Ledger`](crate::channel::Ledger)'s rule) covers it, and replies `{1, balance after}` or
/// `{0, balance}` (the balance unspent, as every debit reports it).
macro_rules! debit_lua {
    () => {
        r"
local function fmt(n) return string.format('%.0f', n) end
local function channel(key)
  return redis.call('HMGET', key, 'state', 'best_sat', 'spent_msat', 'leased_msat',
    'forfeited_msat')
end
local function debit(key, h, paid_sat, amount)
  local balance = paid_sat * 1000 - tonumber(h[3])
  if balance - tonumber(h[4] or '0') - tonumber(h[5] or '0') < amount then
    return {0, fmt(balance)}
  end
  redis.call('HSET', key, 'spent_msat', fmt(tonumber(h[3]) + amount))
  return {1, fmt(balance - amount)}
end
"
    };
}

/// Debits ARGV[1] msat from channel KEYS[1]. Replies `{code, value}`: -1 not found, 2 not
/// open (`value` the state), else as `debit`.
const DEBIT: &str = concat!(
    debit_lua!(),
    r"
local h = channel(KEYS[1])
if not h[1] then return {-1, '0'} end
if h[1] ~= 'open' then return {2, h[1]} end
return debit(KEYS[1], h, tonumber(h[2]), tonumber(ARGV[1]))"
);

/// `DEBIT` and the claim of an idempotency key in one script, unless the key is held: KEYS[1]
/// the channel, KEYS[2] the key's record (a hash that expires by itself); ARGV the amount in
/// msat, the fingerprint, and when the claim lapses (ms since the epoch). Replies
/// `{code, value, fingerprint, response}`: code 3 when the key is held.
const DEBIT_ONCE: &str = concat!(
    debit_lua!(),
    r"
local held = redis.call('HMGET', KEYS[2], 'fp', 'resp')
if held[1] then return {3, '', held[1], held[2]} end
local h = channel(KEYS[1])
if not h[1] then return {-1, '0', false, false} end
if h[1] ~= 'open' then return {2, h[1], false, false} end
local debited = debit(KEYS[1], h, tonumber(h[2]), tonumber(ARGV[1]))
if debited[1] == 1 then
  redis.call('HSET', KEYS[2], 'fp', ARGV[2], 'claim', ARGV[3])
  redis.call('PEXPIREAT', KEYS[2], ARGV[3])
end
return {debited[1], debited[2], false, false}"
);

/// Finishes a claim still in progress: KEYS[1] the key's record; ARGV[1] when the claim
/// lapses (which identifies it), then `keep` with the response and when it expires, or
/// `release`.
const FINISH_ONCE: &str = r"
local held = redis.call('HMGET', KEYS[1], 'fp', 'resp', 'claim')
if not held[1] or held[2] or held[3] ~= ARGV[1] then return 0 end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'resp', ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
end
return 1";

/// `STORE_PAYMENT` then `DEBIT` in one script: KEYS[1] the channel; ARGV the payment, its
/// server amount in sat, and the amount to debit in msat.
const PAY: &str = concat!(
    debit_lua!(),
    r"
local h = channel(KEYS[1])
if not h[1] then return {-1, '0'} end
if h[1] ~= 'open' then return {2, h[1]} end
local best = tonumber(h[2])
if tonumber(ARGV[2]) > best then
  best = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'best', ARGV[1], 'best_sat', ARGV[2])
end
return debit(KEYS[1], h, best, tonumber(ARGV[3]))"
);

/// Moves an open or pending channel to closing with a settlement that covers its spent and
/// leased: KEYS[1] the channel, KEYS[2..4] the open, pending and closing sets; ARGV the
/// payment, its server amount in sat, and the channel id.
const CLOSE_WITH: &str = r"
local h = redis.call('HMGET', KEYS[1], 'state', 'spent_msat', 'score', 'leased_msat',
  'forfeited_msat')
if not h[1] then return -1 end
if h[1] ~= 'open' and h[1] ~= 'pending' then return 0 end
local committed = tonumber(h[2]) + tonumber(h[4] or '0') + tonumber(h[5] or '0')
if committed > tonumber(ARGV[2]) * 1000 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'closing', 'best', ARGV[1], 'best_sat', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], h[3], ARGV[3])
return 1";

const CREDIT: &str = r"
local h = redis.call('HMGET', KEYS[1], 'best_sat', 'spent_msat')
if not h[1] then return {-1, '0'} end
local spent = math.max(tonumber(h[2]) - tonumber(ARGV[1]), 0)
redis.call('HSET', KEYS[1], 'spent_msat', string.format('%.0f', spent))
return {1, string.format('%.0f', tonumber(h[1]) * 1000 - spent)}";

/// Settles a lease and takes a new one (see `LeaseRequest`): KEYS[1] the channel, KEYS[2]
/// its leases (a hash: lease id → msat held), KEYS[3] every lease by expiry (members
/// `channel|lease`); ARGV the lease to settle (or ''), what was used of it, the lease to take
/// (or ''), its least, its most, when it lapses, and the channel id. Replies `{code, amount,
/// value, spent}`: 1 granted (`value` what is paid), 0 insufficient (`value` the balance), 2
/// not open (`value` the state).
const LEASE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'state', 'best_sat', 'spent_msat', 'leased_msat',
  'forfeited_msat')
if not h[1] then return {-1, '0', '0', '0'} end
local function fmt(n) return string.format('%.0f', n) end
local spent = tonumber(h[3])
local leased = tonumber(h[4] or '0')
local paid = tonumber(h[2]) * 1000
if ARGV[1] ~= '' then
  local held = redis.call('HGET', KEYS[2], ARGV[1])
  if held then
    held = tonumber(held)
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[7] .. '|' .. ARGV[1])
    leased = math.max(leased - held, 0)
    spent = spent + math.min(tonumber(ARGV[2]), held)
    redis.call('HSET', KEYS[1], 'spent_msat', fmt(spent), 'leased_msat', fmt(leased))
  end
end
if ARGV[3] == '' then return {1, '0', fmt(paid), fmt(spent)} end
if h[1] ~= 'open' then return {2, '0', h[1], '0'} end
local balance = paid - spent - leased - tonumber(h[5] or '0')
local least = tonumber(ARGV[4])
if balance < least then return {0, '0', fmt(balance), '0'} end
local amount = math.max(math.min(tonumber(ARGV[5]), math.floor(balance / 2)), least)
redis.call('HINCRBY', KEYS[2], ARGV[3], fmt(amount))
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7] .. '|' .. ARGV[3])
redis.call('HSET', KEYS[1], 'leased_msat', fmt(leased + amount))
return {1, fmt(amount), fmt(paid), fmt(spent)}";

/// Forfeits every lease lapsed by ARGV[1] (ms since the epoch): KEYS[1] every lease by
/// expiry; ARGV[2] the key prefix (the channels' and leases' keys share its hash tag, so
/// they are in KEYS[1]'s slot). At most 1000 leases a call. Replies the msat counted.
const EXPIRE_LEASES: &str = r"
local function fmt(n) return string.format('%.0f', n) end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local total = 0
for _, member in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], member)
  local at = string.find(member, '|', 1, true)
  local channel, lease = string.sub(member, 1, at - 1), string.sub(member, at + 1)
  local leases = ARGV[2] .. 'lease:' .. channel
  local held = redis.call('HGET', leases, lease)
  if held then
    redis.call('HDEL', leases, lease)
    local key = ARGV[2] .. 'ch:' .. channel
    local h = redis.call('HMGET', key, 'forfeited_msat', 'leased_msat')
    if redis.call('EXISTS', key) == 1 then
      held = tonumber(held)
      redis.call('HSET', key, 'forfeited_msat', fmt(tonumber(h[1] or '0') + held),
        'leased_msat', fmt(math.max(tonumber(h[2] or '0') - held, 0)))
      total = total + held
    end
  end
end
return fmt(total)";

const TRANSITION: &str = r"
local h = redis.call('HMGET', KEYS[1], 'state', 'score')
if not h[1] then return -1 end
if h[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], h[2], ARGV[3])
return 1";

/// Channels in Redis, shared by many nodes with the lowest latency.
///
/// Every operation on a channel is one Lua script, which Redis runs atomically: the best
/// payment is replaced only by a better one and a debit happens only if the balance covers
/// it, whichever node runs it. Channels are listed through one sorted set per state, scored by
/// expiry.
///
/// **Durability is Redis's.** A method returns once Redis applied the write in memory. Only
/// with the append-only file and `appendfsync always` is it on disk by then; with the common
/// `appendfsync everysec` a Redis crash can lose up to a second of acknowledged payments and
/// debits, and without persistence a Redis restart loses everything. Run Redis with
/// `appendonly yes` and `appendfsync always` (and a replica) when payments must survive it.
///
/// Connections are managed (reconnected automatically); an unreachable Redis is reported as
/// [`StoreError::Unavailable`] within 2 seconds.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::unavailable(error)
}

fn number(text: &str) -> Result<u64, StoreError> {
    text.parse().map_err(|_| unavailable(format!("not a number in Redis: {text:?}")))
}

impl RedisStore {
    /// Connects to `url` (for example `redis://127.0.0.1:6379/`) with [`DEFAULT_PREFIX`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let connection =
            client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(Self { connection, prefix: DEFAULT_PREFIX.to_owned() })
    }

    /// Uses `prefix` for every key (several deployments in one Redis; tests). A prefix
    /// without a Redis Cluster hash tag (`{…}`, not empty) is wrapped in one, so that every
    /// key of the store stays in one slot, as the multi-key scripts require: `tenant-a:`
    /// becomes `{tenant-a:}` (any braces of a prefix without a tag are dropped).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), paychan::store::StoreError> {
    /// use paychan::store::RedisStore;
    /// let store = RedisStore::connect("redis://127.0.0.1/").await?.with_prefix("tenant-a:");
    /// assert_eq!(store.prefix(), "{tenant-a:}");
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = hash_tagged(prefix.into());
        self
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn channel_key(&self, id: ChannelId) -> String {
        format!("{}ch:{id}", self.prefix)
    }

    fn idempotency_key(&self, id: ChannelId, key: &str) -> String {
        format!("{}idem:{id}:{key}", self.prefix)
    }

    fn leases_key(&self, id: ChannelId) -> String {
        format!("{}lease:{id}", self.prefix)
    }

    fn expiry_key(&self) -> String {
        format!("{}leases", self.prefix)
    }

    fn state_key(&self, state: ChannelState) -> String {
        format!("{}state:{}", self.prefix, state.as_str())
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &str,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let script = Script::new(script);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg.as_slice());
        }
        let mut connection = self.connection.clone();
        invocation.invoke_async(&mut connection).await.map_err(unavailable)
    }

    async fn load_key(&self, key: &str) -> Result<Option<ChannelRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let fields: std::collections::HashMap<String, Vec<u8>> =
            connection.hgetall(key).await.map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let text = |name: &str| -> Result<String, StoreError> {
            let bytes =
                fields.get(name).ok_or_else(|| unavailable(format!("field {name} missing")))?;
            String::from_utf8(bytes.clone()).map_err(unavailable)
        };
        let channel: Channel = serde_json::from_str(&text("channel")?).map_err(unavailable)?;
        let best = fields.get("best").filter(|b| !b.is_empty());
        Ok(Some(ChannelRecord {
            channel,
            key_index: u32::try_from(number(&text("key_index")?)?).map_err(unavailable)?,
            state: ChannelState::from_name(&text("state")?)?,
            best: best.map(|b| deserialize::<Transaction>(b)).transpose().map_err(unavailable)?,
            spent: MilliSats::from_msat(number(&text("spent_msat")?)?),
            // Absent until the channel's first lease.
            leased: match fields.get("leased_msat") {
                Some(_) => MilliSats::from_msat(number(&text("leased_msat")?)?),
                None => MilliSats::ZERO,
            },
            forfeited: match fields.get("forfeited_msat") {
                Some(_) => MilliSats::from_msat(number(&text("forfeited_msat")?)?),
                None => MilliSats::ZERO,
            },
            // Absent in channels created before the field existed.
            funded_at: match fields.get("funded_at") {
                Some(_) => u32::try_from(number(&text("funded_at")?)?).map_err(unavailable)?,
                None => 0,
            },
        }))
    }
}

fn arg(value: impl ToString) -> Vec<u8> {
    value.to_string().into_bytes()
}

impl ChannelStore for RedisStore {
    async fn create(&self, record: ChannelRecord) -> Result<(), StoreError> {
        let paid = record.paid_amount().to_sat();
        if record.channel.params().value.to_sat() > MAX_CHANNEL_SAT {
            return Err(unavailable("channel value above the Redis store's exact range"));
        }
        let expiry = record.channel.params().expiry;
        let score = u64::from(expiry.is_block_time()) << 32 | u64::from(expiry.to_consensus_u32());
        let created: i64 = self
            .invoke(
                CREATE,
                &[self.channel_key(record.id()), self.state_key(record.state)],
                &[
                    arg(record.id()),
                    serde_json::to_vec(&record.channel).map_err(unavailable)?,
                    arg(record.key_index),
                    arg(record.state.as_str()),
                    record.best.as_ref().map(serialize).unwrap_or_default(),
                    arg(paid),
                    arg(record.spent.to_msat()),
                    arg(score),
                    arg(record.funded_at),
                ],
            )
            .await?;
        if created == 1 { Ok(()) } else { Err(StoreError::AlreadyExists) }
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>, StoreError> {
        self.load_key(&self.channel_key(id)).await
    }

    async fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> Result<StorePayment, StoreError> {
        let offered = crate::channel::server_amount(&payment);
        let (code, value): (i64, String) = self
            .invoke(
                STORE_PAYMENT,
                &[self.channel_key(id)],
                &[serialize(&payment), arg(offered.to_sat())],
            )
            .await?;
        match code {
            1 => Ok(StorePayment::Stored { balance: MilliSats::from_msat(number(&value)?) }),
            0 => Ok(StorePayment::Stale { best: Amount::from_sat(number(&value)?) }),
            _ => Err(StoreError::NotFound),
        }
    }

    async fn debit(&self, id: ChannelId, amount: MilliSats) -> Result<Debit, StoreError> {
        let reply = self.invoke(DEBIT, &[self.channel_key(id)], &[arg(amount.to_msat())]).await?;
        debit_reply(reply)
    }

    async fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> Result<Debit, StoreError> {
        let offered = payment.server_amount();
        let args = [payment.into_encoded(), arg(offered.to_sat()), arg(amount.to_msat())];
        debit_reply(self.invoke(PAY, &[self.channel_key(id)], &args).await?)
    }

    async fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> Result<DebitOnce, StoreError> {
        // Redis expires the record by its own clock at `expires_at`; `claim.now` is not needed.
        let keys = [self.channel_key(id), self.idempotency_key(id, &claim.key)];
        let args = [arg(amount.to_msat()), claim.fingerprint.to_vec(), arg(claim.expires_at)];
        let (code, value, fingerprint, response): (i64, String, Option<Vec<u8>>, Option<Vec<u8>>) =
            self.invoke(DEBIT_ONCE, &keys, &args).await?;
        if code == 3 {
            let fingerprint = fingerprint
                .and_then(|fingerprint| <[u8; 32]>::try_from(fingerprint).ok())
                .ok_or_else(|| unavailable("an idempotency fingerprint that is not 32 bytes"))?;
            return Ok(DebitOnce::Claimed(IdempotencyRecord::new(fingerprint, response)));
        }
        debit_reply((code, value)).map(DebitOnce::Debit)
    }

    async fn finish_once(
        &self,
        id: ChannelId,
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let claimed = arg(claim.expires_at);
        let args = match response {
            Some(response) => vec![claimed, arg("keep"), response, arg(expires_at)],
            None => vec![claimed, arg("release")],
        };
        let _finished: i64 =
            self.invoke(FINISH_ONCE, &[self.idempotency_key(id, &claim.key)], &args).await?;
        Ok(())
    }

    async fn close_with(&self, id: ChannelId, payment: CheckedPayment) -> Result<bool, StoreError> {
        let args = [payment.encoded().into_owned(), arg(payment.server_amount().to_sat()), arg(id)];
        let keys = [
            self.channel_key(id),
            self.state_key(ChannelState::Open),
            self.state_key(ChannelState::Pending),
            self.state_key(ChannelState::Closing),
        ];
        let code: i64 = self.invoke(CLOSE_WITH, &keys, &args).await?;
        match code {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::NotFound),
        }
    }

    async fn credit(&self, id: ChannelId, amount: MilliSats) -> Result<MilliSats, StoreError> {
        let (code, value): (i64, String) =
            self.invoke(CREDIT, &[self.channel_key(id)], &[arg(amount.to_msat())]).await?;
        if code == 1 {
            Ok(MilliSats::from_msat(number(&value)?))
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn lease(&self, id: ChannelId, request: LeaseRequest) -> Result<Lease, StoreError> {
        let (settle, used) = request
            .settle
            .map_or((Vec::new(), arg(0)), |(lease, used)| (arg(lease.get()), arg(used.to_msat())));
        let (take, least, most, until) = request.take.map_or_else(
            || (Vec::new(), arg(0), arg(0), arg(0)),
            |take| {
                let least = arg(take.least.to_msat());
                (arg(take.id.get()), least, arg(take.most.to_msat()), arg(take.expires_at))
            },
        );
        let keys = [self.channel_key(id), self.leases_key(id), self.expiry_key()];
        let args = [settle, used, take, least, most, until, arg(id)];
        let (code, amount, value, spent): (i64, String, String, String) =
            self.invoke(LEASE, &keys, &args).await?;
        let msat = |text: &str| number(text).map(MilliSats::from_msat);
        match code {
            1 => {
                let (amount, paid, spent) = (msat(&amount)?, msat(&value)?, msat(&spent)?);
                Ok(Lease::Granted { amount, paid, spent })
            }
            0 => Ok(Lease::Insufficient { balance: msat(&value)? }),
            2 => Ok(Lease::NotOpen { state: ChannelState::from_name(&value)? }),
            _ => Err(StoreError::NotFound),
        }
    }

    async fn expire_leases(&self, now: u64) -> Result<MilliSats, StoreError> {
        let args = [arg(now), arg(&self.prefix)];
        let total: String = self.invoke(EXPIRE_LEASES, &[self.expiry_key()], &args).await?;
        number(&total).map(MilliSats::from_msat)
    }

    async fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> Result<bool, StoreError> {
        super::legal_move(from, to)?;
        let code: i64 = self
            .invoke(
                TRANSITION,
                &[self.channel_key(id), self.state_key(from), self.state_key(to)],
                &[arg(from.as_str()), arg(to.as_str()), arg(id)],
            )
            .await?;
        match code {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::NotFound),
        }
    }

    async fn next_key_index(&self) -> Result<u32, StoreError> {
        let mut connection = self.connection.clone();
        let next: u64 =
            connection.incr(format!("{}key_index", self.prefix), 1).await.map_err(unavailable)?;
        super::key_index(next.checked_sub(1).ok_or_else(|| unavailable("INCR returned 0"))?)
    }

    async fn list(&self, state: ChannelState) -> Result<Vec<ChannelRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> =
            connection.zrange(self.state_key(state), 0, -1).await.map_err(unavailable)?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let key = format!("{}ch:{id}", self.prefix);
            // A channel that moved on between the two reads is skipped, not misreported.
            if let Some(record) = self.load_key(&key).await?.filter(|r| r.state == state) {
                records.push(record);
            }
        }
        Ok(records)
    }

    async fn count(&self, state: ChannelState) -> Result<usize, StoreError> {
        let mut connection = self.connection.clone();
        connection.zcard(self.state_key(state)).await.map_err(unavailable)
    }
}

/// Reads the reply of `DEBIT` or `PAY`.
fn debit_reply((code, value): (i64, String)) -> Result<Debit, StoreError> {
    match code {
        1 => Ok(Debit::Debited { balance: MilliSats::from_msat(number(&value)?) }),
        0 => Ok(Debit::Insufficient { balance: MilliSats::from_msat(number(&value)?) }),
        2 => Ok(Debit::NotOpen { state: ChannelState::from_name(&value)? }),
        _ => Err(StoreError::NotFound),
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::hash_tagged;

    #[test]
    fn a_prefix_always_carries_a_hash_tag() {
        for (prefix, tagged) in [
            ("{paychan}:", "{paychan}:"),
            ("app:{tenant}:", "app:{tenant}:"),
            ("tenant-a:", "{tenant-a:}"),
            ("{}:", "{:}"),
            ("}x{", "{x}"),
            ("", "{paychan}"),
        ] {
            assert_eq!(hash_tagged(prefix.to_owned()), tagged, "{prefix}");
        }
    }
}
