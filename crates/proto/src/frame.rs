use serde::{de::DeserializeOwned, Serialize};

/// First two bytes of every ragfleet frame.
pub const FRAME_MAGIC: [u8; 2] = *b"RF";
/// Version of the wire protocol; a frame of another version is refused.
pub const PROTOCOL_VERSION: u16 = 9;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame too short ({0} bytes)")]
    TooShort(usize),
    /// The magic bytes are wrong: not a ragfleet frame.
    #[error("bad frame magic")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("protocol version {got} not supported (this node speaks {PROTOCOL_VERSION})")]
    Version {
        /// Version found in the frame.
        got: u16,
    },
    /// The body does not decode.
    #[error("malformed frame body: {0}")]
    Body(String),
    /// The value could not be encoded (only seen locally).
    #[error("frame encode failed: {0}")]
    Encode(String),
}

/// A payload with a defensive decoder: `from_bytes` never panics.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<T>(pub Result<T, FrameError>);

impl<T> Frame<T> {
    /// Wraps a value.
    pub fn ok(value: T) -> Self {
        Frame(Ok(value))
    }
}

impl<T: Serialize + DeserializeOwned> Frame<T> {
    /// Encodes the frame (header + body). A frame holding a decode error encodes as an empty
    /// body, which decodes again to an error.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&FRAME_MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        if let Ok(v) = &self.0 {
            match postcard::to_extend(v, out) {
                Ok(o) => return o,
                Err(e) => {
                    tracing_free_log(&e.to_string());
                    let mut o = Vec::with_capacity(4);
                    o.extend_from_slice(&FRAME_MAGIC);
                    o.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
                    return o;
                }
            }
        }
        out
    }

    /// Decodes a frame; every failure is an error value.
    pub fn decode(bytes: &[u8]) -> Self {
        Frame(Self::try_decode(bytes))
    }

    fn try_decode(bytes: &[u8]) -> Result<T, FrameError> {
        if bytes.len() < 4 {
            return Err(FrameError::TooShort(bytes.len()));
        }
        if bytes[..2] != FRAME_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let got = u16::from_be_bytes([bytes[2], bytes[3]]);
        if got != PROTOCOL_VERSION {
            return Err(FrameError::Version { got });
        }
        let (v, rest) = postcard::take_from_bytes::<T>(&bytes[4..])
            .map_err(|e| FrameError::Body(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Body(format!("{} trailing bytes", rest.len())));
        }
        Ok(v)
    }
}

fn tracing_free_log(msg: &str) {
    eprintln!("ragfleet-proto: encode failed: {msg}");
}
