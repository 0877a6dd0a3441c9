//! `paychan report --from … --to … [--format csv|json] [--by channel|client]`: what each
//! channel, or each client key (the customer), paid and was charged in a period, read from the
//! event log (`[events]`).

use std::collections::{BTreeMap, BTreeSet};

use paychan::wire::ChannelId;
use serde::Serialize;

use crate::Error;
use crate::events::{Event, Kind};

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Csv,
    Json,
}

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum By {
    Channel,
    Client,
}

/// One channel's or one client's period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Row {
    /// The channel (rows by channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) channel: Option<ChannelId>,
    pub(crate) client_key: String,
    /// Channels with an event in the period.
    pub(crate) channels: usize,
    pub(crate) opened: u64,
    pub(crate) top_ups: u64,
    pub(crate) closed: u64,
    pub(crate) settled: u64,
    pub(crate) refunded: u64,
    pub(crate) failed: u64,
    /// What the client prepaid: the first payment and the top-ups.
    pub(crate) paid_msat: u64,
    /// What its requests consumed (negative only if more was given back than charged).
    pub(crate) charged_msat: i64,
    /// What settled closes paid the server on chain.
    pub(crate) settled_msat: u64,
}

/// The rows of `events` whose time is in `from..to`, one per channel or per client key,
/// sorted by it.
pub(crate) fn usage(events: &[Event], from: u64, to: u64, by: By) -> Vec<Row> {
    let mut rows: BTreeMap<String, (Row, BTreeSet<ChannelId>)> = BTreeMap::new();
    for event in events.iter().filter(|e| (from..to).contains(&e.time)) {
        let key = match by {
            By::Channel => event.channel.to_string(),
            By::Client => event.client_key.clone(),
        };
        let (row, channels) = rows.entry(key).or_default();
        row.channel = (by == By::Channel).then_some(event.channel);
        row.client_key.clone_from(&event.client_key);
        channels.insert(event.channel);
        match event.kind {
            Kind::Opened => row.opened += 1,
            Kind::ToppedUp => row.top_ups += 1,
            Kind::Closed => row.closed += 1,
            Kind::Settled => row.settled += 1,
            Kind::Refunded => row.refunded += 1,
            Kind::Failed => row.failed += 1,
            Kind::Funded | Kind::Usage | Kind::Closing => {}
        }
        if event.kind == Kind::Settled {
            row.settled_msat = row.settled_msat.saturating_add(event.paid_msat.to_msat());
        }
        let prepaid = u64::try_from(event.paid_delta_msat).unwrap_or(0);
        row.paid_msat = row.paid_msat.saturating_add(prepaid);
        row.charged_msat = row.charged_msat.saturating_add(event.spent_delta_msat);
    }
    rows.into_values().map(|(row, channels)| Row { channels: channels.len(), ..row }).collect()
}

/// The report as CSV: a header, then a line per row.
pub(crate) fn csv(rows: &[Row], by: By) -> String {
    let mut text = match by {
        By::Channel => "channel,client_key",
        By::Client => "client_key,channels",
    }
    .to_owned();
    text.push_str(
        ",opened,top_ups,closed,settled,refunded,failed,paid_msat,charged_msat,settled_msat\n",
    );
    for row in rows {
        let key = match (by, row.channel) {
            (By::Channel, Some(channel)) => format!("{channel},{}", row.client_key),
            _ => format!("{},{}", row.client_key, row.channels),
        };
        text.push_str(&format!(
            "{key},{},{},{},{},{},{},{},{},{}\n",
            row.opened,
            row.top_ups,
            row.closed,
            row.settled,
            row.refunded,
            row.failed,
            row.paid_msat,
            row.charged_msat,
            row.settled_msat
        ));
    }
    text
}

/// Unix seconds of `text`: seconds (`1767225600`), a UTC date (`2026-01-01`) or a UTC time
/// (`2026-01-01T12:00:00Z`, the `Z` optional).
pub(crate) fn parse_time(text: &str) -> Result<u64, String> {
    let bad = || format!("{text}: expected Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| bad());
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00"));
    let numbers = |part: &str, sep: char| -> Option<Vec<u64>> {
        part.split(sep).map(|n| n.parse::<u64>().ok()).collect()
    };
    let (Some(date), Some(time)) = (numbers(date, '-'), numbers(time.trim_end_matches('Z'), ':'))
    else {
        return Err(bad());
    };
    let (&[year, month, day], &[hour, minute, second]) = (date.as_slice(), time.as_slice()) else {
        return Err(bad());
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=days_in_month).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    Ok(days_since_epoch(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days from 1970-01-01 to `year-month-day` (proleptic Gregorian; Howard Hinnant's
/// `days_from_civil`), for years from 1970.
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `paychan report --from … --to …`: prints the usage of the period read from `log`.
pub(crate) fn report(
    log: &std::path::Path,
    from: u64,
    to: u64,
    format: Format,
    by: By,
) -> Result<(), Error> {
    if from >= to {
        return Err(
            format!("--from ({from}) must be before --to ({to}): the period is empty").into()
        );
    }
    let (events, _cut) = crate::events::read(log)?;
    let rows = usage(&events, from, to, by);
    match format {
        Format::Csv => print!("{}", csv(&rows, by)),
        Format::Json => {
            let report = serde_json::json!({ "from": from, "to": to, "by": by, "rows": rows });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use paychan::MilliSats;
    use paychan::channel::ChannelState;

    fn event(
        channel: u8,
        client: &str,
        kind: Kind,
        time: u64,
        paid: (u64, i64),
        spent: (u64, i64),
    ) -> Event {
        let channel: ChannelId =
            format!("{}:0", format!("{channel:02x}").repeat(32)).parse().unwrap();
        Event {
            id: format!("{channel}/{time}"),
            kind,
            channel,
            seq: 0,
            client_key: client.to_owned(),
            state: ChannelState::Open,
            paid_msat: MilliSats::from_msat(paid.0),
            spent_msat: MilliSats::from_msat(spent.0),
            paid_delta_msat: paid.1,
            spent_delta_msat: spent.1,
            txid: None,
            time,
        }
    }

    #[test]
    fn a_period_counts_what_happened_in_it() {
        let log = [
            event(1, "alice", Kind::Opened, 100, (5_000, 5_000), (0, 0)),
            event(1, "alice", Kind::Usage, 150, (5_000, 0), (2_000, 2_000)),
            event(2, "alice", Kind::Opened, 180, (3_000, 3_000), (1_000, 1_000)),
            event(1, "alice", Kind::ToppedUp, 200, (9_000, 4_000), (6_000, 4_000)),
            event(3, "bob", Kind::Opened, 210, (4_000, 4_000), (0, 0)),
            // A fair close pays less than the best: not a payment, nor a charge.
            event(1, "alice", Kind::Closing, 300, (7_000, -2_000), (7_000, 1_000)),
            event(1, "alice", Kind::Settled, 400, (7_000, 0), (7_000, 0)),
        ];
        let all = usage(&log, 0, u64::MAX, By::Channel);
        assert_eq!(all.len(), 3);
        let first = &all[0];
        assert_eq!((first.opened, first.top_ups, first.closed, first.settled), (1, 1, 0, 1));
        assert_eq!(
            (first.paid_msat, first.charged_msat, first.settled_msat),
            (9_000, 7_000, 7_000)
        );
        let clients = usage(&log, 0, u64::MAX, By::Client);
        let alice = &clients[0];
        assert_eq!((alice.client_key.as_str(), alice.channels, alice.opened), ("alice", 2, 2));
        assert_eq!((alice.paid_msat, alice.charged_msat), (12_000, 8_000));
        // From 150 to 300: the usage, the second channel's opening, the top-up and bob.
        let period = usage(&log, 150, 300, By::Client);
        assert_eq!(
            period.iter().map(|r| (r.paid_msat, r.charged_msat)).collect::<Vec<_>>(),
            [(7_000, 7_000), (4_000, 0)]
        );
        let text = csv(&period, By::Client);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "client_key,channels,opened,top_ups,closed,settled,refunded,failed,paid_msat,\
                 charged_msat,settled_msat",
                "alice,2,1,1,0,0,0,0,7000,7000,0",
                "bob,1,1,0,0,0,0,0,4000,0,0",
            ]
        );
        assert!(
            csv(&all, By::Channel)
                .lines()
                .nth(1)
                .unwrap()
                .starts_with(&format!("{},alice,", all[0].channel.unwrap()))
        );
    }

    #[test]
    fn times_are_seconds_dates_or_utc_times() {
        assert_eq!(parse_time("1767225600"), Ok(1_767_225_600));
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2026-01-01"), Ok(1_767_225_600));
        assert_eq!(parse_time("2024-02-29T12:30:01Z"), Ok(1_709_209_801));
        assert_eq!(parse_time("2000-03-01T00:00:00"), Ok(951_868_800));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-01-01T25:00:00",
            "2026-01",
            "-5",
            "1969-12-31",
            "2026-02-29",
            "2026-04-31",
            "2026-02-31",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
