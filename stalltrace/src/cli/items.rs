//! A list answer read item by item as the daemon streams it (`conns -o json`): each item is
//! checked against its schema and written out before the next arrives, so the client neither
//! waits for the whole answer (200 000 connections: 85 MB) nor holds it.
use std::{fmt, io::Read};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use stalltrace_core::api::ApiError;

/// Reads one answer line from `reader`, giving each item of its `result` array to `each` in
/// order; how many there were. An error answer is returned as its [`ApiError`] in `Ok(Err)`;
/// malformed JSON, an item of another shape, or an error from `each`, as `Err`.
pub(super) fn for_each_item<T, R, F>(
    reader: R,
    each: F,
) -> Result<Result<usize, ApiError>, serde_json::Error>
where
    T: DeserializeOwned,
    R: Read,
    F: FnMut(T) -> std::io::Result<()>,
{
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let answer = AnswerSeed {
        each,
        item: std::marker::PhantomData,
    };
    let outcome = answer.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(outcome)
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
        ] {
            assert!(collect(answer).0.is_err(), "{answer:?}");
        }
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
