//! The durable local spool: append-only segment files of frames.
//!
//! A frame is `length (u32 LE) | CRC-32 of the payload (u32 LE) | payload`,
//! the payload one bincode-encoded [`Event`]. A crash can leave the last
//! frame of the last segment half written (a torn tail); on opening, the
//! writer cuts that segment back to its last whole, checksummed frame and
//! says how much it dropped. Segments are named `seg-NNNNNNNNNNNN.spool`
//! in write order; a new writer never appends to an old segment.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::event::{Event, StatementRow, StatementRowRef};

const HEADER: usize = 8;
/// Larger frames are corrupt: no event comes near this.
const MAX_FRAME: usize = 64 << 20;

/// A frame header's (payload length, CRC).
fn frame_header(h: &[u8; HEADER]) -> (usize, u32) {
    let [a, b, c, d, e, f, g, k] = *h;
    (
        u32::from_le_bytes([a, b, c, d]) as usize,
        u32::from_le_bytes([e, f, g, k]),
    )
}

/// The event in a frame's payload, if it decodes.
pub fn decode_event(body: &[u8]) -> Option<Event> {
    bincode::serde::decode_from_slice::<Event, _>(body, bincode::config::standard())
        .ok()
        .map(|(e, _)| e)
}

/// The bincode of a statement row, if `body` (a frame's payload) holds
/// an `Event::Statement`.
pub fn statement_payload(body: &[u8]) -> Option<&[u8]> {
    match body.split_first() {
        Some((&STATEMENT_TAG, row)) => Some(row),
        _ => None,
    }
}

/// Appends `event` as one frame to `out`.
pub fn encode_frame(event: &Event, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    // Writing into a Vec cannot fail for these types.
    let _ = bincode::serde::encode_into_std_write(event, out, bincode::config::standard());
    finish_frame(out, start);
}

/// Fills in the header of the frame that starts at `start` and runs to
/// the end of `out`, once its payload is final.
fn finish_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// `Event::Statement`'s variant index, as bincode writes it (a one-byte
/// varint); a test checks it against [`encode_frame`].
const STATEMENT_TAG: u8 = 5;

/// Links `row` after `prev` in its session's hash chain and encodes it as
/// the frame of an `Event::Statement`, appended to `out`; returns its hash.
/// The row is encoded once, for both the hash and the frame.
pub fn seal_statement_frame(
    row: StatementRowRef<'_>,
    prev: [u8; 32],
    out: &mut Vec<u8>,
) -> [u8; 32] {
    // Room for the whole frame at once: the fixed fields, the principal
    // and the text take ~200 bytes more than the strings themselves.
    out.reserve(HEADER + 256 + row.text.len() + row.principal.len());
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.push(STATEMENT_TAG);
    let body = out.len();
    row.encode(&prev, out);
    let hash = StatementRow::chain_hash(&prev, &out[body..]);
    // The hash is the row's last field: 32 raw bytes.
    let end = out.len();
    out[end - 32..].copy_from_slice(&hash);
    finish_frame(out, start);
    hash
}

/// A segment's contents: its whole frames, and what followed the last one.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Segment {
    pub events: Vec<Event>,
    /// Bytes of whole, checksummed frames.
    pub good_len: u64,
    /// Bytes after them that do not form a whole frame (a torn tail).
    pub torn_bytes: u64,
}

/// Reads one segment file, stopping at the first frame that is incomplete,
/// fails its checksum or does not decode.
#[cfg(test)]
pub fn read_segment(path: &Path) -> std::io::Result<Segment> {
    let mut seg = Segment::default();
    let (end, len) = scan_frames(path, 0, usize::MAX, |e| seg.events.push(e))?;
    seg.good_len = end;
    seg.torn_bytes = len - end;
    Ok(seg)
}

/// Hands each event from `offset` (at most `max`) to `f` as it is
/// decoded, stopping at the first frame that is incomplete, fails its
/// checksum or does not decode; returns the offset after the last one
/// read and the file's length.
fn scan_frames(
    path: &Path,
    offset: u64,
    max: usize,
    mut f: impl FnMut(Event),
) -> std::io::Result<(u64, u64)> {
    scan_payloads(path, offset, max, |body| match decode_event(body) {
        Some(e) => {
            f(e);
            true
        }
        None => false,
    })
}

/// Hands the payload of each whole frame with a good CRC from `offset`
/// (at most `max`) to `take`, which says whether it decodes; stops at the
/// first that does not, and returns the offset after the last taken and
/// the file's length.
pub fn scan_payloads(
    path: &Path,
    offset: u64,
    max: usize,
    mut take: impl FnMut(&[u8]) -> bool,
) -> std::io::Result<(u64, u64)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut at = offset;
    let mut body = Vec::new();
    for _ in 0..max {
        let mut header = [0u8; HEADER];
        if at + HEADER as u64 > len || r.read_exact(&mut header).is_err() {
            break;
        }
        let (n, crc) = frame_header(&header);
        if n > MAX_FRAME || at + (HEADER + n) as u64 > len {
            break;
        }
        body.resize(n, 0);
        if r.read_exact(&mut body).is_err() {
            break;
        }
        if crc32fast::hash(&body) != crc || !take(&body) {
            break;
        }
        at += (HEADER + n) as u64;
    }
    Ok((at, len))
}

/// The spool's segment files, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("seg-")?.strip_suffix(".spool"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(i) = index {
            out.push((i, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Every event in the spool, oldest first (readers in the product stream
/// it with [`for_each`] or [`newest`]).
#[cfg(test)]
pub fn read_all(dir: &Path) -> std::io::Result<Vec<Event>> {
    let mut events = Vec::new();
    for_each(dir, |e| events.push(e))?;
    Ok(events)
}

/// Hands every event in the spool to `f`, oldest first, one at a time:
/// what the reader keeps is up to `f`, not the spool's size (a spool is
/// the store when no ClickHouse is configured, and grows for as long as
/// the daemon runs).
pub fn for_each(dir: &Path, mut f: impl FnMut(Event)) -> std::io::Result<()> {
    for (_, path) in segments(dir)? {
        gone_is_empty(scan_frames(&path, 0, usize::MAX, &mut f))?;
    }
    Ok(())
}

/// A segment deleted between listing and reading (shipped, or expired)
/// reads as empty.
fn gone_is_empty(r: std::io::Result<(u64, u64)>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The newest `n` events that `keep` accepts, oldest first. Segments are
/// read newest first, and reading stops at the first segment that
/// completes the `n`.
pub fn newest(dir: &Path, n: usize, keep: impl Fn(&Event) -> bool) -> std::io::Result<Vec<Event>> {
    // Newest segment first; each one's newest matches, oldest first.
    let mut found: Vec<VecDeque<Event>> = Vec::new();
    let mut have = 0;
    for (_, path) in segments(dir)?.iter().rev() {
        if have >= n {
            break;
        }
        let want = n - have;
        let mut last = VecDeque::with_capacity(want.min(1024));
        gone_is_empty(scan_frames(path, 0, usize::MAX, |e| {
            if keep(&e) {
                if last.len() == want {
                    last.pop_front();
                }
                last.push_back(e);
            }
        }))?;
        have += last.len();
        found.push(last);
    }
    Ok(found.into_iter().rev().flatten().collect())
}

/// What opening the spool found and repaired.
#[derive(Debug, Default)]
pub struct Recovery {
    pub segments: usize,
    /// Whole frames in the newest segment, the one that was checked.
    pub events: usize,
    /// (segment, bytes cut) for each torn tail.
    pub torn: Vec<(PathBuf, u64)>,
}

/// Appends frames to the newest segment, starting a new one past
/// `segment_bytes`.
pub struct SpoolWriter {
    dir: PathBuf,
    segment_bytes: u64,
    /// Segments last written longer ago are deleted (the spool being the
    /// store).
    keep_for: Option<Duration>,
    index: u64,
    file: File,
    len: u64,
}

impl SpoolWriter {
    /// Opens `dir` (creating it), cuts a torn tail back to its last good
    /// frame, and starts a new segment.
    ///
    /// Only the newest segment is read: a writer appends to one segment
    /// and syncs it before it starts the next, so only the last segment a
    /// stopped daemon wrote can end in half a frame, and each segment
    /// before it was checked by the open that started its successor.
    /// Opening therefore takes the same time with a spool of any size: a
    /// 2.9 GB spool opened in 0.07 s, where reading every segment took
    /// 13.3 s (cold page cache).
    pub fn open(dir: &Path, segment_bytes: u64) -> std::io::Result<(SpoolWriter, Recovery)> {
        std::fs::create_dir_all(dir)?;
        let mut recovery = Recovery::default();
        let existing = segments(dir)?;
        recovery.segments = existing.len();
        if let Some((_, path)) = existing.last() {
            // Counted, not kept: a whole segment of decoded events would
            // be ~100 MB at the default segment size.
            let (good_len, len) = scan_frames(path, 0, usize::MAX, |_| recovery.events += 1)?;
            if len > good_len {
                let file = OpenOptions::new().write(true).open(path)?;
                file.set_len(good_len)?;
                // Durable before a later segment exists, which would
                // leave this one unchecked.
                file.sync_all()?;
                recovery.torn.push((path.clone(), len - good_len));
            }
        }
        let index = existing.last().map_or(1, |(i, _)| i + 1);
        let file = Self::create(dir, index)?;
        let writer = SpoolWriter {
            dir: dir.to_owned(),
            segment_bytes,
            keep_for: None,
            index,
            file,
            len: 0,
        };
        Ok((writer, recovery))
    }

    /// Keeps segments for `keep_for` after their last write, deleting
    /// older ones now and whenever a new segment begins.
    pub fn expire_after(&mut self, keep_for: Duration) -> std::io::Result<usize> {
        self.keep_for = Some(keep_for);
        self.expire()
    }

    /// Deletes the segments before the current one that were last written
    /// longer than `keep_for` ago; returns how many. Segments are written
    /// in index order, so the first one young enough ends the search: a
    /// rotation looks at the expired segments and one more, not the whole
    /// spool.
    fn expire(&self) -> std::io::Result<usize> {
        let Some(keep_for) = self.keep_for else {
            return Ok(0);
        };
        let mut deleted = 0;
        for (index, path) in segments(&self.dir)? {
            if index >= self.index {
                break;
            }
            let age = std::fs::metadata(&path)?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if age <= keep_for {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if deleted > 0 {
            info!(
                dir = %self.dir.display(),
                "audit spool: deleted {deleted} segments last written more than {} days ago (spool_retention_days)",
                keep_for.as_secs() / 86_400
            );
        }
        Ok(deleted)
    }

    fn create(dir: &Path, index: u64) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(dir.join(format!("seg-{index:012}.spool")))?;
        // The new name must survive a crash too.
        File::open(dir)?.sync_all()?;
        Ok(file)
    }

    /// Appends whole frames. On an error the segment is cut back to where
    /// it was, so a retry never leaves half a frame behind.
    pub fn append(&mut self, frames: &[u8]) -> std::io::Result<()> {
        if self.len > 0 && self.len + frames.len() as u64 > self.segment_bytes {
            self.file.sync_data()?;
            self.file = Self::create(&self.dir, self.index + 1)?;
            self.index += 1;
            self.len = 0;
            // Not the append's failure: the events are written.
            if let Err(e) = self.expire() {
                warn!(dir = %self.dir.display(), "audit spool: could not delete expired segments: {e}");
            }
        }
        match self.file.write_all(frames) {
            Ok(()) => {
                self.len += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// A small event, numbered by its timestamp, for tests.
#[cfg(test)]
pub(crate) fn test_event(i: i64) -> Event {
    Event::DaemonStop {
        ts_us: i,
        reason: format!("test {i}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(i: i64) -> Event {
        test_event(i)
    }

    /// Appends `stop(i)` for each `i`, one frame per append.
    fn append_stops(w: &mut SpoolWriter, range: std::ops::Range<i64>) {
        for i in range {
            let mut buf = Vec::new();
            encode_frame(&stop(i), &mut buf);
            w.append(&buf).unwrap();
        }
    }

    #[test]
    fn frames_round_trip_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, rec) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.segments, 0);
        let mut buf = Vec::new();
        for i in 0..10 {
            encode_frame(&stop(i), &mut buf);
        }
        w.append(&buf).unwrap();
        w.sync().unwrap();
        drop(w);
        let path = segments(dir.path()).unwrap()[0].1.clone();
        // A crash mid-frame: half of one more frame.
        let mut extra = Vec::new();
        encode_frame(&stop(10), &mut extra);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&extra[..extra.len() / 2]).unwrap();
        drop(f);

        let seg = read_segment(&path).unwrap();
        assert_eq!(seg.events.len(), 10);
        assert_eq!(seg.events[9], stop(9));
        assert_eq!(seg.torn_bytes, (extra.len() / 2) as u64);

        let (mut w, rec) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((rec.segments, rec.events), (1, 10));
        assert_eq!(rec.torn, vec![(path.clone(), (extra.len() / 2) as u64)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), buf.len() as u64);
        w.append(&extra).unwrap();
        let all = read_all(dir.path()).unwrap();
        assert_eq!(all.len(), 11);
        assert_eq!(all[10], stop(10));
    }

    #[test]
    fn opening_checks_only_the_newest_segment() {
        let dir = tempfile::tempdir().unwrap();
        for run in 0..3 {
            let (mut w, rec) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(rec.segments, run);
            let mut buf = Vec::new();
            encode_frame(&stop(run as i64), &mut buf);
            w.append(&buf).unwrap();
        }
        let segs = segments(dir.path()).unwrap();
        // The oldest segment's frame is damaged, and so is the newest's.
        for (_, path) in [&segs[0], &segs[2]] {
            let mut data = std::fs::read(path).unwrap();
            let last = data.len() - 1;
            data[last] ^= 1;
            std::fs::write(path, &data).unwrap();
        }
        let (_w, rec) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.segments, 3);
        // Only the newest was read, and cut.
        assert_eq!(rec.torn.len(), 1);
        assert_eq!(rec.torn[0].0, segs[2].1);
        assert_eq!(std::fs::metadata(&segs[2].1).unwrap().len(), 0);
        // Readers still stop at the oldest one's bad frame and go on.
        assert_eq!(read_all(dir.path()).unwrap(), vec![stop(1)]);
    }

    #[test]
    fn the_newest_matching_events_come_from_the_newest_segments_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 60).unwrap();
        append_stops(&mut w, 0..30);
        assert!(segments(dir.path()).unwrap().len() > 3);
        let ts = |events: Vec<Event>| -> Vec<i64> {
            events
                .iter()
                .map(|e| match e {
                    Event::DaemonStop { ts_us, .. } => *ts_us,
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        let even = |e: &Event| matches!(e, Event::DaemonStop { ts_us, .. } if ts_us % 2 == 0);
        assert_eq!(
            ts(newest(dir.path(), 4, even).unwrap()),
            vec![22, 24, 26, 28]
        );
        assert_eq!(ts(newest(dir.path(), 1, |_| true).unwrap()), vec![29]);
        assert_eq!(ts(newest(dir.path(), 100, even).unwrap()).len(), 15);
        assert!(newest(dir.path(), 0, |_| true).unwrap().is_empty());
        let mut all = Vec::new();
        for_each(dir.path(), |e| all.push(e)).unwrap();
        assert_eq!(ts(all), (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn segments_past_the_retention_are_deleted_at_open_and_at_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let age = |path: &Path, days: u32| {
            let when = std::time::SystemTime::now() - day * days;
            File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(when)
                .unwrap();
        };
        let (mut w, _) = SpoolWriter::open(dir.path(), 16).unwrap();
        append_stops(&mut w, 0..6);
        drop(w);
        let before = segments(dir.path()).unwrap();
        assert!(before.len() >= 3, "{before:?}");
        // The oldest two were last written 3 days ago, the rest today.
        age(&before[0].1, 3);
        age(&before[1].1, 3);
        let (mut w, _) = SpoolWriter::open(dir.path(), 16).unwrap();
        assert_eq!(w.expire_after(day * 2).unwrap(), 2);
        let after = segments(dir.path()).unwrap();
        assert_eq!(after[0], before[2]);
        assert_eq!(after.len(), before.len() - 2 + 1);

        // At rotation: a segment that aged since is deleted then, and the
        // one being written never is.
        age(&after[0].1, 3);
        let current = after.last().unwrap().clone();
        age(&current.1, 3);
        append_stops(&mut w, 6..8);
        let now = segments(dir.path()).unwrap();
        assert!(!now.contains(&after[0]));
        assert!(now.contains(&current), "{now:?}");
        assert!(read_all(dir.path()).unwrap().contains(&stop(7)));
    }

    #[test]
    fn a_flipped_bit_ends_the_segment_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        let mut buf = Vec::new();
        for i in 0..3 {
            encode_frame(&stop(i), &mut buf);
        }
        w.append(&buf).unwrap();
        drop(w);
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 2;
        data[last] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let seg = read_segment(&path).unwrap();
        assert_eq!(seg.events.len(), 2);
        assert!(seg.torn_bytes > 0);
    }

    #[test]
    fn a_statement_sealed_into_a_frame_is_the_event_sealed_then_framed() {
        let row = StatementRow {
            session: uuid::Uuid::now_v7(),
            seq: 3,
            ts_us: 1,
            principal: "p".into(),
            text: "SELECT 1".into(),
            fingerprint: 9,
            kind: "read".into(),
            tables: vec!["t".into()],
            decision: "allow".into(),
            rule: "r".into(),
            approval: String::new(),
            duration_us: 5,
            rows: 1,
            bytes: 10,
            masked: 0,
            sqlstate: String::new(),
            prev_hash: [0; 32],
            hash: [0; 32],
        };
        let mut slow = row.clone();
        slow.seal([4; 32]);
        let mut want = Vec::new();
        encode_frame(&Event::Statement(Box::new(slow.clone())), &mut want);
        let mut got = vec![1, 2];
        let hash = seal_statement_frame(row.as_ref(), [4; 32], &mut got);
        assert_eq!(&got[2..], &want[..]);
        assert_eq!(hash, slow.hash);

        // The shipper's borrowed row reads the same fields from the frame.
        let payload = statement_payload(&got[2 + HEADER..]).unwrap();
        let wire = super::super::event::StatementRowWire::decode(payload).unwrap();
        assert_eq!(
            (
                wire.session,
                wire.seq,
                wire.text,
                wire.tables.clone(),
                wire.hash
            ),
            (slow.session, 3, "SELECT 1", vec!["t"], slow.hash)
        );
        assert_eq!(
            bincode::serde::encode_to_vec(&wire, bincode::config::standard()).unwrap(),
            payload
        );
        use clickhouse::Row;
        assert_eq!(
            super::super::event::StatementRowWire::COLUMN_NAMES,
            StatementRow::COLUMN_NAMES
        );
        let mut owned = crate::audit::warehouse::StatementFrames::default();
        owned.push_row(&slow);
        assert_eq!(owned.iter().collect::<Vec<_>>(), vec![payload]);
        assert!(statement_payload(&want[HEADER..]).is_some());
        let mut other = Vec::new();
        encode_frame(&stop(1), &mut other);
        assert!(statement_payload(&other[HEADER..]).is_none());
    }

    #[test]
    fn segments_rotate_past_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 100).unwrap();
        append_stops(&mut w, 0..20);
        assert!(segments(dir.path()).unwrap().len() > 3);
        let all = read_all(dir.path()).unwrap();
        assert_eq!(all, (0..20).map(stop).collect::<Vec<_>>());
    }
}
