//! A list answer read item by item as the daemon streams it (`conns -o json`): each item is
//! parsed (as the caller's type) and handed over before the next arrives, so the client
//! neither waits for the whole answer (200 000 connections: 85 MB) nor holds it.
//!
//! Items are parsed from the bytes received so far (serde_json parses a slice several times
//! faster than a reader, which it takes a byte at a time): the streamed answer's head is
//! `{"version":N,"ok":true,"result":[`, then items separated by commas, then `]}`. Any other
//! answer (an error) is read whole and parsed as an object.
use std::{fmt, io::Read};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use stalltrace_core::api::ApiError;

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 256 * 1024;

/// Reads one answer line from `reader`, giving each item of its `result` array to `each` in
/// order; how many there were. An error answer is returned as its [`ApiError`] in `Ok(Err)`;
/// malformed JSON, an item of another shape, or an error from `each`, as `Err`.
pub(super) fn for_each_item<T, R, F>(
    reader: R,
    mut each: F,
) -> Result<Result<usize, ApiError>, serde_json::Error>
where
    T: DeserializeOwned,
    R: Read,
    F: FnMut(T) -> std::io::Result<()>,
{
    let mut input = Input {
        reader,
        buffer: Vec::with_capacity(READ_BYTES),
        pos: 0,
        ended: false,
    };
    // Enough to tell the streamed head from anything else.
    while input.buffer.len() < 64 && input.more()? {}
    let Some(start) = streamed_items_start(&input.buffer) else {
        while input.more()? {}
        let mut deserializer = serde_json::Deserializer::from_slice(&input.buffer);
        let answer = AnswerSeed {
            each,
            item: std::marker::PhantomData,
        };
        let outcome = answer.deserialize(&mut deserializer)?;
        deserializer.end()?;
        return Ok(outcome);
    };
    input.pos = start;
    let mut count = 0;
    loop {
        // An item, or the array's end.
        if input.skip_whitespace()? == b']' && count == 0 {
            input.pos += 1;
            break;
        }
        let item = loop {
            let mut items =
                serde_json::Deserializer::from_slice(&input.buffer[input.pos..]).into_iter::<T>();
            match items.next() {
                // A number at the end of what was read may go on in the next read.
                Some(Ok(_))
                    if input.pos + items.byte_offset() == input.buffer.len() && !input.ended =>
                {
                    input.more()?;
                }
                Some(Ok(item)) => {
                    input.pos += items.byte_offset();
                    break item;
                }
                Some(Err(err)) if err.is_eof() && !input.ended => {
                    input.more()?;
                }
                Some(Err(err)) => return Err(err),
                None => return Err(eof()),
            }
        };
        each(item).map_err(de::Error::custom)?;
        count += 1;
        match input.skip_whitespace()? {
            b',' => input.pos += 1,
            b']' => {
                input.pos += 1;
                break;
            }
            other => {
                return Err(de::Error::custom(format!(
                    "expected `,` or `]` after an item, found {:?}",
                    char::from(other)
                )))
            }
        }
    }
    if input.skip_whitespace()? != b'}' {
        return Err(de::Error::custom("expected `}` after the items"));
    }
    input.pos += 1;
    while input.more()? {}
    if !input.buffer[input.pos..].trim_ascii().is_empty() {
        return Err(de::Error::custom("trailing characters after the answer"));
    }
    Ok(Ok(count))
}

/// Where the items of a streamed answer start in `head` (its first bytes), if it is one.
fn streamed_items_start(head: &[u8]) -> Option<usize> {
    let rest = head.strip_prefix(b"{\"version\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let tail = b",\"ok\":true,\"result\":[";
    (digits > 0 && rest[digits..].starts_with(tail))
        .then_some(head.len() - rest.len() + digits + tail.len())
}

fn eof() -> serde_json::Error {
    de::Error::custom(
        "the answer ended early: the daemon stopped or closed the connection mid-answer, so \
         what was printed is incomplete (is the daemon still running? `stalltrace status`)",
    )
}

/// The answer's bytes as they arrive, consumed from `pos`.
struct Input<R> {
    reader: R,
    buffer: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl<R: Read> Input<R> {
    /// Reads more; false at the end of the answer.
    fn more(&mut self) -> Result<bool, serde_json::Error> {
        if self.ended {
            return Ok(false);
        }
        // Consumed bytes go once they are most of the buffer.
        if self.pos > self.buffer.len() / 2 {
            self.buffer.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buffer.len();
        self.buffer.resize(len + READ_BYTES, 0);
        let read = loop {
            match self.reader.read(&mut self.buffer[len..]) {
                Ok(read) => break read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    self.buffer.truncate(len);
                    return Err(serde_json::Error::io(err));
                }
            }
        };
        self.buffer.truncate(len + read);
        self.ended = read == 0;
        Ok(!self.ended)
    }

    /// The next byte that is not whitespace (reading more as needed), left unconsumed.
    fn skip_whitespace(&mut self) -> Result<u8, serde_json::Error> {
        loop {
            while let Some(&byte) = self.buffer.get(self.pos) {
                if !byte.is_ascii_whitespace() {
                    return Ok(byte);
                }
                self.pos += 1;
            }
            if !self.more()? {
                return Err(eof());
            }
        }
    }
}

struct AnswerSeed<T, F> {
    each: F,
    item: std::marker::PhantomData<T>,
}

impl<'de, T, F> DeserializeSeed<'de> for AnswerSeed<T, F>
where
    T: DeserializeOwned,
    F: FnMut(T) -> std::io::Result<()>,
{
    type Value = Result<usize, ApiError>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, T, F> Visitor<'de> for AnswerSeed<T, F>
where
    T: DeserializeOwned,
    F: FnMut(T) -> std::io::Result<()>,
{
    type Value = Result<usize, ApiError>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an API answer object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut items = None;
        let mut error = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "result" => {
                    items = Some(map.next_value_seed(ItemsSeed {
                        each: &mut self.each,
                        item: std::marker::PhantomData,
                    })?);
                }
                "error" => error = Some(map.next_value::<ApiError>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (items, error) {
            (_, Some(error)) => Ok(Err(error)),
            (Some(count), None) => Ok(Ok(count)),
            (None, None) => Err(de::Error::custom("the daemon sent an empty answer")),
        }
    }
}

struct ItemsSeed<'a, T, F> {
    each: &'a mut F,
    item: std::marker::PhantomData<T>,
}

impl<'de, T, F> DeserializeSeed<'de> for ItemsSeed<'_, T, F>
where
    T: DeserializeOwned,
    F: FnMut(T) -> std::io::Result<()>,
{
    type Value = usize;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T, F> Visitor<'de> for ItemsSeed<'_, T, F>
where
    T: DeserializeOwned,
    F: FnMut(T) -> std::io::Result<()>,
{
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while let Some(item) = seq.next_element::<T>()? {
            (self.each)(item).map_err(de::Error::custom)?;
            count += 1;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stalltrace_core::api::ErrorCode;

    fn collect(answer: &str) -> (Result<Result<usize, ApiError>, serde_json::Error>, Vec<u32>) {
        let mut seen = Vec::new();
        let outcome = for_each_item(answer.as_bytes(), |item: u32| {
            seen.push(item);
            Ok(())
        });
        (outcome, seen)
    }

    /// Gives its bytes a few at a time, as a socket may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(3);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn numbers_split_between_reads_are_put_together() {
        let mut seen = Vec::new();
        let answer = "{\"version\":1,\"ok\":true,\"result\":[12345,678901]}";
        for_each_item(Trickle(answer.as_bytes()), |item: u32| {
            seen.push(item);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(seen, [12345, 678_901]);
    }

    #[test]
    fn items_split_anywhere_between_reads_are_put_together() {
        let mut seen = Vec::new();
        let answer =
            "{\"version\":1,\"ok\":true,\"result\":[{\"a\":[1,2]},{\"a\":[]},{\"a\":[3]}]}\n";
        let count = for_each_item(Trickle(answer.as_bytes()), |item: serde_json::Value| {
            seen.push(item);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(count, 3);
        assert_eq!(seen[0]["a"][1], 2);
        assert_eq!(seen[2]["a"][0], 3);
    }

    #[test]
    fn items_come_one_by_one_in_order() {
        let (outcome, seen) = collect("{\"version\":1,\"ok\":true,\"result\":[3,1,2]}\n");
        assert_eq!(outcome.unwrap().unwrap(), 3);
        assert_eq!(seen, [3, 1, 2]);
        let (outcome, _) = collect("{\"version\":1,\"ok\":true,\"result\":[]}");
        assert_eq!(outcome.unwrap().unwrap(), 0);
    }

    #[test]
    fn an_error_answer_is_the_daemons_error() {
        let (outcome, seen) = collect(
            "{\"version\":1,\"ok\":false,\"error\":{\"code\":\"bad_request\",\"message\":\"no\"}}",
        );
        let error = outcome.unwrap().unwrap_err();
        assert_eq!(error.code, ErrorCode::BadRequest);
        assert!(seen.is_empty());
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for answer in [
            "",
            "{\"ok\":true}",
            "{\"ok\":true,\"result\":[1,\"x\"]}",
            "{\"ok\":true,\"result\":[1,2",
            "[1,2]",
            "{\"ok\":true,\"result\":[1]} trailing",
            "{\"version\":1,\"ok\":true,\"result\":[1,\"x\"]}",
            "{\"version\":1,\"ok\":true,\"result\":[1,2",
            "{\"version\":1,\"ok\":true,\"result\":[1,2]",
            "{\"version\":1,\"ok\":true,\"result\":[1 2]}",
            "{\"version\":1,\"ok\":true,\"result\":[,]}",
            "{\"version\":1,\"ok\":true,\"result\":[1]} trailing",
        ] {
            assert!(collect(answer).0.is_err(), "{answer:?}");
        }
    }

    #[test]
    fn an_answer_cut_short_says_the_daemon_went_away() {
        let error = collect("{\"version\":1,\"ok\":true,\"result\":[1,2")
            .0
            .unwrap_err();
        assert!(error.to_string().contains("the daemon stopped"), "{error}");
    }

    #[test]
    fn a_failing_writer_stops_the_read() {
        let mut calls = 0;
        let outcome = for_each_item("{\"ok\":true,\"result\":[1,2,3]}".as_bytes(), |_: u32| {
            calls += 1;
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        });
        assert!(outcome.is_err());
        assert_eq!(calls, 1);
    }
}
