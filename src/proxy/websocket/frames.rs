//! Where one direction of a tunnel is between frames (RFC 6455 §5.2), read from the frames'
//! heads only.
//!
//! The tunnel copies bytes and never looks into payloads, but to end a tunnel with a close
//! frame of its own (at shutdown) the gateway must put that frame where one frame ends and the
//! next begins: in the middle of a frame it would corrupt the stream. A frame's head (2 to 14
//! bytes) says how long its payload is, so following the heads costs a few operations per
//! frame, not per byte. Control frames may come between the fragments of a message (§5.4), so
//! any frame boundary will do.
//!
//! Extensions (`permessage-deflate`) change what a payload means, never how long a frame is,
//! and a close frame is a control frame that no extension compresses.

/// The opcode of a close frame.
const OP_CLOSE: u8 = 0x8;

/// 1001 Going Away: "an endpoint is going away, such as a server going down" (§7.4.1).
const GOING_AWAY: [u8; 2] = 1001u16.to_be_bytes();

/// Follows one direction of a tunnel from frame head to frame head.
#[derive(Debug, Default)]
pub(super) struct Frames {
    /// The head being read, when it came in pieces.
    head: [u8; 14],
    /// Bytes of `head` read so far; 0 between frames and in a payload.
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current (or last whole) frame's opcode.
    opcode: u8,
    /// A whole close frame went this way: this side has begun the closing handshake.
    closed: bool,
}

impl Frames {
    /// Whether the bytes seen so far end exactly where a frame ended.
    pub(super) fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.left == 0
    }

    /// Whether a whole close frame went this way.
    pub(super) fn closed(&self) -> bool {
        self.closed
    }

    /// Follows all of `data`.
    pub(super) fn pass(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.step(data);
            data = &data[n..];
        }
    }

    /// How many bytes of `data` reach the next frame boundary (0 when already at one), or
    /// `None` if no frame ends within `data` (all of it was followed).
    pub(super) fn follow_to_boundary(&mut self, data: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        let n = self.step(data);
        self.at_boundary().then_some(n)
    }

    /// Follows `data` up to the end of the current frame (or to its own end, whichever comes
    /// first) and returns how many bytes that was.
    fn step(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        if self.left == 0 {
            while self.head_len < self.head_needs() {
                let Some(&b) = data.get(used) else {
                    return used;
                };
                self.head[self.head_len] = b;
                self.head_len += 1;
                used += 1;
            }
            self.left = self.payload_len();
            self.opcode = self.head[0] & 0x0f;
            self.head_len = 0;
            if self.left == 0 {
                self.frame_ended();
                return used;
            }
        }
        let n = u64::try_from(data.len() - used)
            .unwrap_or(u64::MAX)
            .min(self.left);
        self.left -= n;
        // `n` is at most what is left of `data`, a usize.
        used += usize::try_from(n).unwrap_or(data.len() - used);
        if self.left == 0 {
            self.frame_ended();
        }
        used
    }

    /// How long the head being read is, as far as its bytes so far tell.
    fn head_needs(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let extended = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut b = [0; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    fn frame_ended(&mut self) {
        if self.opcode == OP_CLOSE {
            self.closed = true;
        }
    }
}

/// A close frame with code 1001 as a server sends it (to the client): unmasked.
pub(super) fn going_away_to_client() -> [u8; 4] {
    [0x80 | OP_CLOSE, 2, GOING_AWAY[0], GOING_AWAY[1]]
}

/// A close frame with code 1001 as a client sends it (to the upstream): masked with `key`.
pub(super) fn going_away_to_server(key: [u8; 4]) -> [u8; 8] {
    [
        0x80 | OP_CLOSE,
        0x80 | 2,
        key[0],
        key[1],
        key[2],
        key[3],
        GOING_AWAY[0] ^ key[0],
        GOING_AWAY[1] ^ key[1],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as tungstenite writes it.
    fn frame(
        opcode: tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode,
        payload: &[u8],
        masked: bool,
    ) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let mut f = Frame::message(payload.to_vec(), opcode, true);
        if masked {
            f.header_mut().mask = Some([1, 2, 3, 4]);
        }
        let mut out = Vec::new();
        f.format(&mut out).unwrap();
        out
    }

    fn text(payload: &[u8], masked: bool) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        frame(OpCode::Data(Data::Text), payload, masked)
    }

    #[test]
    fn boundaries_are_found_for_every_length_form_fed_byte_by_byte() {
        for masked in [false, true] {
            for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
                let bytes = text(&vec![b'x'; len], masked);
                let mut f = Frames::default();
                for (i, b) in bytes.iter().enumerate() {
                    assert!(
                        i == 0 || !f.at_boundary(),
                        "len {len} masked {masked}: boundary at byte {i}"
                    );
                    f.pass(std::slice::from_ref(b));
                }
                assert!(f.at_boundary(), "len {len} masked {masked}");
                assert!(!f.closed());
            }
        }
    }

    #[test]
    fn follow_to_boundary_stops_where_the_current_frame_ends() {
        let first = text(b"hello", false);
        let second = text(&[b'y'; 300], false);
        let stream: Vec<u8> = first.iter().chain(&second).copied().collect();
        let mut f = Frames::default();
        // Three bytes into the first frame, then the rest of the stream in one chunk.
        f.pass(&stream[..3]);
        assert_eq!(f.follow_to_boundary(&stream[3..]), Some(first.len() - 3));
        assert_eq!(f.follow_to_boundary(&stream[first.len()..]), Some(0));
        // Into the second frame: no boundary within 10 of its bytes.
        let mut g = Frames::default();
        g.pass(&first);
        g.pass(&second[..1]);
        assert_eq!(g.follow_to_boundary(&second[1..11]), None);
        assert_eq!(g.follow_to_boundary(&second[11..]), Some(second.len() - 11));
    }

    #[test]
    fn a_close_frame_is_noticed_and_ours_parse_as_1001() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};
        let mut f = Frames::default();
        // A client's close frame (1000), masked with 1, 2, 3, 4.
        f.pass(&[0x88, 0x82, 1, 2, 3, 4, 3 ^ 1, 232 ^ 2]);
        assert!(f.closed() && f.at_boundary());

        for (bytes, masked) in [
            (going_away_to_client().to_vec(), false),
            (going_away_to_server([9, 8, 7, 6]).to_vec(), true),
        ] {
            let mut cursor = std::io::Cursor::new(bytes.as_slice());
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(header.opcode, OpCode::Control(Control::Close));
            assert!(header.is_final);
            assert_eq!(header.mask.is_some(), masked);
            assert_eq!(len, 2);
            let mut payload = bytes[usize::try_from(cursor.position()).unwrap()..].to_vec();
            if let Some(key) = header.mask {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= key[i % 4];
                }
            }
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
            let mut f = Frames::default();
            f.pass(&bytes);
            assert!(f.closed() && f.at_boundary());
        }
    }
}
