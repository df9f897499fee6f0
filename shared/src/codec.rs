//! The gRPC codec of Herald's services: prost's, except that a message which does not decode (a
//! string field that is not UTF-8, a truncated or garbled field) is the caller's fault and is
//! answered `INVALID_ARGUMENT` naming the field prost could not read, not tonic's `INTERNAL`.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// [`ProstCodec`] with decode failures reported as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct HeraldCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for HeraldCodec<T, U> {
    fn default() -> Self {
        HeraldCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for HeraldCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = InputDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InputDecoder(self.0.decoder())
    }
}

/// A decoder whose failures are `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct InputDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for InputDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf).map_err(|s| Status::invalid_argument(s.message().to_owned()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
