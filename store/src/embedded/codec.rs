//! The byte layout of records in the store file. Hand-written rather than
//! serde so that the layout is fixed here, visible, and cheap to decode.
//!
//! A key's record: create revision, mod revision, version, lease (0: none),
//! each a little-endian i64, then the value.
//! A revision's history entry: its events, each a kind byte, the key's
//! length (u32) and bytes, then the key's record with the value's length
//! (u32) before the value.

use crate::{EventKind, KeyValue, LeaseId, WatchEvent};

const HEADER: usize = 4 * 8;

pub(super) fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    put_header(&mut out, kv);
    out.extend_from_slice(&kv.value);
    out
}

pub(super) fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, String> {
    let mut reader = Reader(bytes);
    let mut kv = reader.header(key)?;
    kv.value = reader.0.to_vec();
    Ok(kv)
}

pub(super) fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 1,
            EventKind::Delete => 2,
        });
        put_bytes(&mut out, event.kv.key.as_bytes());
        put_header(&mut out, &event.kv);
        put_bytes(&mut out, &event.kv.value);
    }
    out
}

pub(super) fn decode_events(bytes: &[u8]) -> Result<Vec<WatchEvent>, String> {
    let mut reader = Reader(bytes);
    let mut events = Vec::new();
    while !reader.0.is_empty() {
        let kind = match reader.take(1)?[0] {
            1 => EventKind::Put,
            2 => EventKind::Delete,
            other => return Err(format!("unknown event kind {other}")),
        };
        let key = String::from_utf8(reader.bytes()?.to_vec())
            .map_err(|_| "event key is not UTF-8".to_owned())?;
        let mut kv = reader.header(&key)?;
        kv.value = reader.bytes()?.to_vec();
        events.push(WatchEvent { kind, kv });
    }
    Ok(events)
}

fn put_header(out: &mut Vec<u8>, kv: &KeyValue) {
    for field in [
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease.map_or(0, |l| l.0),
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
}

pub(super) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are far below 4 GiB: redb itself caps values at 3 GiB.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "record truncated: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub(super) fn i64(&mut self) -> Result<i64, String> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(buf))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], String> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        self.take(u32::from_le_bytes(buf) as usize)
    }

    fn header(&mut self, key: &str) -> Result<KeyValue, String> {
        let create_revision = self.i64()?;
        let mod_revision = self.i64()?;
        let version = self.i64()?;
        let lease = self.i64()?;
        Ok(KeyValue {
            key: key.to_owned(),
            value: Vec::new(),
            create_revision,
            mod_revision,
            version,
            lease: (lease != 0).then_some(LeaseId(lease)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], lease: Option<LeaseId>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease,
        }
    }

    #[test]
    fn records_and_events_round_trip() {
        let record = kv("/a", b"hello", Some(LeaseId(7)));
        assert_eq!(
            decode_record("/a", &encode_record(&record)),
            Ok(record.clone())
        );

        let events = vec![
            WatchEvent {
                kind: EventKind::Put,
                kv: record,
            },
            WatchEvent {
                kind: EventKind::Delete,
                kv: kv("/b\u{e9}", b"", None),
            },
        ];
        assert_eq!(decode_events(&encode_events(&events)), Ok(events));
    }

    #[test]
    fn truncated_bytes_are_an_error_not_a_panic() {
        let bytes = encode_record(&kv("/a", b"v", None));
        assert!(decode_record("/a", &bytes[..10]).is_err());
        let events = encode_events(&[WatchEvent {
            kind: EventKind::Put,
            kv: kv("/a", b"v", None),
        }]);
        for cut in 0..events.len() {
            let _ = decode_events(&events[..cut]);
        }
        assert!(decode_events(&[9]).is_err());
    }
}
