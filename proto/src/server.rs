//! The server side of `ledger.v1.LedgerService`, generated from the same proto as [`crate::pb`]
//! and using its messages, except that `StreamLedger` answers [`StreamLedgerFrame`]s.
//!
//! A master sends every change to every subscriber: with a `StreamLedgerResponse` per stream,
//! each of a thousand subscribers would copy the policy and encode it again. A frame can instead
//! carry the encoding of a response made once and shared (a [`Bytes`] is reference counted), so
//! one change costs one encoding however many streams send it. The bytes on the wire are the
//! same, and clients decode them as the generated [`pb::StreamLedgerResponse`].
//!
//! Its codec, [`LedgerCodec`], is prost's except for a request that does not decode: tonic's
//! answers INTERNAL (the server failed), this one INVALID_ARGUMENT with the reason
//! `REQUEST_UNDECODABLE` (the request is wrong), from prost's typed error.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::pb;

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/server/ledger.v1.rs"));
}

pub use generated::ledger_service_server;

/// One `StreamLedgerResponse` on its way to a subscriber: a message to encode for this stream,
/// or the encoding of one, made once and shared by every stream that sends it.
#[derive(Debug, Clone)]
pub enum StreamLedgerFrame {
    /// A message of this stream alone (a reset, a snapshot row, `caught_up`, `progress`).
    Message(pb::StreamLedgerResponse),
    /// The protobuf encoding of a [`pb::StreamLedgerResponse`], sent as it is; made by
    /// [`StreamLedgerFrame::encode`].
    Encoded(Bytes),
}

impl StreamLedgerFrame {
    /// The encoding of `response` that [`StreamLedgerFrame::Encoded`] carries: exactly what
    /// prost writes for it.
    pub fn encode(response: &pb::StreamLedgerResponse) -> Bytes {
        Bytes::from(response.encode_to_vec())
    }

    /// The response this frame sends, decoded if it is encoded.
    pub fn into_message(self) -> Result<pb::StreamLedgerResponse, prost::DecodeError> {
        match self {
            StreamLedgerFrame::Message(message) => Ok(message),
            StreamLedgerFrame::Encoded(bytes) => pb::StreamLedgerResponse::decode(bytes),
        }
    }
}

impl Default for StreamLedgerFrame {
    fn default() -> Self {
        StreamLedgerFrame::Message(pb::StreamLedgerResponse::default())
    }
}

/// Encodes as the [`pb::StreamLedgerResponse`] it stands for. Servers only encode; decoding (into
/// a [`StreamLedgerFrame::Message`]) is there for completeness.
impl Message for StreamLedgerFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            StreamLedgerFrame::Message(message) => message.encode_raw(buf),
            StreamLedgerFrame::Encoded(bytes) => buf.put_slice(bytes),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if let StreamLedgerFrame::Encoded(bytes) = self {
            *self = StreamLedgerFrame::Message(pb::StreamLedgerResponse::decode(bytes.clone())?);
        }
        match self {
            StreamLedgerFrame::Message(message) => message.merge_field(tag, wire_type, buf, ctx),
            StreamLedgerFrame::Encoded(_) => unreachable!("decoded just above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            StreamLedgerFrame::Message(message) => message.encoded_len(),
            StreamLedgerFrame::Encoded(bytes) => bytes.len(),
        }
    }

    fn clear(&mut self) {
        *self = StreamLedgerFrame::default();
    }
}

/// The codec of the generated server: prost's encoding, and a decoder that refuses what does
/// not decode with [`crate::errors::undecodable`].
#[derive(Debug)]
pub struct LedgerCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for LedgerCodec<T, U> {
    fn default() -> Self {
        LedgerCodec(PhantomData)
    }
}

impl<T, U> Codec for LedgerCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LedgerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LedgerDecoder(PhantomData)
    }
}

/// Decodes a request as prost does; a request that does not decode is refused as the client's
/// error (INVALID_ARGUMENT, `REQUEST_UNDECODABLE`), with prost's description of it.
#[derive(Debug)]
pub struct LedgerDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for LedgerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| crate::errors::undecodable(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::stream_ledger_response::Event;

    fn inserted() -> pb::StreamLedgerResponse {
        pb::StreamLedgerResponse {
            seq: 7,
            event: Some(Event::Inserted(pb::Policy {
                id: "a1".into(),
                r#type: "operator".into(),
                json: r#"{"operator": {"name": "op1"}}"#.into(),
                seq: 7,
            })),
        }
    }

    #[test]
    fn both_forms_encode_as_the_response() {
        let response = inserted();
        let expected = response.encode_to_vec();
        for frame in [
            StreamLedgerFrame::Message(response.clone()),
            StreamLedgerFrame::Encoded(StreamLedgerFrame::encode(&response)),
        ] {
            assert_eq!(frame.encoded_len(), expected.len());
            assert_eq!(frame.encode_to_vec(), expected);
            assert_eq!(frame.into_message().unwrap(), response);
        }
    }

    #[test]
    fn decoding_merges_into_the_message() {
        let first = inserted();
        let second = pb::StreamLedgerResponse {
            seq: 8,
            event: Some(Event::DeletedId("a1".into())),
        };
        let mut frame = StreamLedgerFrame::Encoded(StreamLedgerFrame::encode(&first));
        frame.merge(second.encode_to_vec().as_slice()).unwrap();
        assert_eq!(frame.clone().into_message().unwrap(), second);
        let decoded = StreamLedgerFrame::decode(first.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.into_message().unwrap(), first);
        frame.clear();
        assert_eq!(frame.encoded_len(), 0);
    }
}
