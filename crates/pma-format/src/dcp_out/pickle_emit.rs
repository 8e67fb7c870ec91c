//! A minimal protocol-2 pickle emitter: just the opcodes a DCP `.metadata` and a torch.save
//! `data.pkl` need.
//!
//! Protocol 2 is the newest protocol every Python 3 reads and the one torch itself uses for
//! `data.pkl`. It needs no memo and no framing, so the emitter is a plain append-only opcode
//! writer: values are pushed in the order the unpickler pops them. Nothing here knows about
//! torch; [`super::metadata_emit`] and [`super::zip_emit`] build object graphs from these calls.

/// Appends protocol-2 opcodes to a buffer. `new` writes `PROTO 2`, `finish` writes `STOP`.
#[derive(Debug)]
pub(crate) struct PickleEmitter {
    buf: Vec<u8>,
}

const PROTO: u8 = 0x80;
const GLOBAL: u8 = b'c';
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const EMPTY_TUPLE: u8 = b')';
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINUNICODE: u8 = b'X';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const REDUCE: u8 = b'R';
const BUILD: u8 = b'b';
const NEWOBJ: u8 = 0x81;
const BINPERSID: u8 = b'Q';
const STOP: u8 = b'.';

impl PickleEmitter {
    /// A new stream, opened with `PROTO 2`.
    pub(crate) fn new() -> PickleEmitter {
        PickleEmitter {
            buf: vec![PROTO, 2],
        }
    }

    /// Closes the stream with `STOP` and returns its bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.buf.push(STOP);
        self.buf
    }

    fn op(&mut self, op: u8) -> &mut Self {
        self.buf.push(op);
        self
    }

    /// `GLOBAL module name`: pushes the named class or function. Names are ASCII identifiers
    /// chosen by this crate, never user input, so they cannot contain the newline terminator.
    pub(crate) fn global(&mut self, module: &str, name: &str) -> &mut Self {
        debug_assert!(!module.contains('\n') && !name.contains('\n'));
        self.buf.push(GLOBAL);
        self.buf.extend_from_slice(module.as_bytes());
        self.buf.push(b'\n');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'\n');
        self
    }

    /// An integer, in the shortest encoding Python's own pickler would pick: BININT1 / BININT2
    /// for small non-negative values, BININT for any other i32, LONG1 beyond (file offsets of
    /// multi-GiB `.distcp` files and element counts of large chunks need it).
    pub(crate) fn int(&mut self, v: i128) -> &mut Self {
        if (0..=0xff).contains(&v) {
            self.buf.extend_from_slice(&[BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.buf.push(BININT2);
            self.buf.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.buf.push(BININT);
            self.buf.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement in the fewest bytes that keep the sign.
            let bytes = v.to_le_bytes();
            let mut n = bytes.len();
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.buf.extend_from_slice(&[LONG1, n as u8]);
            self.buf.extend_from_slice(&bytes[..n]);
        }
        self
    }

    /// An unsigned integer (sizes, offsets, element counts).
    pub(crate) fn uint(&mut self, v: u64) -> &mut Self {
        self.int(i128::from(v))
    }

    /// A `str`, as BINUNICODE (UTF-8 with a u32 length). Strings over 4 GiB cannot occur: they
    /// are tensor names and file names.
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.buf.push(BINUNICODE);
        let n = u32::try_from(s.len()).expect("names are far shorter than 4 GiB");
        self.buf.extend_from_slice(&n.to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// `None`.
    pub(crate) fn none(&mut self) -> &mut Self {
        self.op(NONE)
    }

    /// `True` / `False`.
    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        self.op(if v { NEWTRUE } else { NEWFALSE })
    }

    /// Opens a MARK-delimited group (closed by `tuple`, `appends` or `setitems`).
    pub(crate) fn mark(&mut self) -> &mut Self {
        self.op(MARK)
    }

    /// `TUPLE`: the values since the last MARK become a tuple.
    pub(crate) fn tuple(&mut self) -> &mut Self {
        self.op(TUPLE)
    }

    /// `TUPLE1`: the top value becomes a 1-tuple.
    pub(crate) fn tuple1(&mut self) -> &mut Self {
        self.op(TUPLE1)
    }

    /// `()`.
    pub(crate) fn empty_tuple(&mut self) -> &mut Self {
        self.op(EMPTY_TUPLE)
    }

    /// `[]`, to be filled with `mark` ... `appends`.
    pub(crate) fn empty_list(&mut self) -> &mut Self {
        self.op(EMPTY_LIST)
    }

    /// `APPENDS`: the values since the last MARK are appended to the list below it.
    pub(crate) fn appends(&mut self) -> &mut Self {
        self.op(APPENDS)
    }

    /// `{}`, to be filled with `mark` ... `setitems`.
    pub(crate) fn empty_dict(&mut self) -> &mut Self {
        self.op(EMPTY_DICT)
    }

    /// `SETITEMS`: the key/value pairs since the last MARK go into the dict below it, in order.
    pub(crate) fn setitems(&mut self) -> &mut Self {
        self.op(SETITEMS)
    }

    /// `REDUCE`: calls the callable below the argument tuple on top.
    pub(crate) fn reduce(&mut self) -> &mut Self {
        self.op(REDUCE)
    }

    /// `BUILD`: applies the state on top to the object below it (`__setstate__` or
    /// `__dict__.update`).
    pub(crate) fn build(&mut self) -> &mut Self {
        self.op(BUILD)
    }

    /// `NEWOBJ`: `cls.__new__(cls, *args)` from the class and argument tuple on top.
    pub(crate) fn newobj(&mut self) -> &mut Self {
        self.op(NEWOBJ)
    }

    /// `BINPERSID`: the top value is a persistent id (torch.save's storage references).
    pub(crate) fn binpersid(&mut self) -> &mut Self {
        self.op(BINPERSID)
    }

    /// A tuple of unsigned integers: `MARK ints TUPLE` (also right for the empty tuple, though
    /// `EMPTY_TUPLE` is shorter, and what Python writes).
    pub(crate) fn uint_tuple(&mut self, values: &[u64]) -> &mut Self {
        if values.is_empty() {
            return self.empty_tuple();
        }
        self.mark();
        for &v in values {
            self.uint(v);
        }
        self.tuple()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(f: impl FnOnce(&mut PickleEmitter)) -> Vec<u8> {
        let mut p = PickleEmitter::new();
        f(&mut p);
        p.finish()
    }

    /// Golden bytes from CPython 3.11 `pickle.dumps(v, protocol=2)` where our encoding is the
    /// same as Python's (it does not memoize ints, None or bools).
    #[test]
    fn scalars_match_python_protocol_2() {
        assert_eq!(
            one(|p| {
                p.int(5);
            }),
            b"\x80\x02K\x05."
        );
        assert_eq!(
            one(|p| {
                p.int(300);
            }),
            b"\x80\x02M,\x01."
        );
        assert_eq!(
            one(|p| {
                p.int(70000);
            }),
            b"\x80\x02Jp\x11\x01\x00."
        );
        assert_eq!(
            one(|p| {
                p.int(-1);
            }),
            b"\x80\x02J\xff\xff\xff\xff."
        );
        assert_eq!(
            one(|p| {
                p.uint(1 << 31);
            }),
            b"\x80\x02\x8a\x05\x00\x00\x00\x80\x00."
        );
        assert_eq!(
            one(|p| {
                p.uint(1 << 63);
            }),
            b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."
        );
        assert_eq!(
            one(|p| {
                p.none();
            }),
            b"\x80\x02N."
        );
        assert_eq!(
            one(|p| {
                p.bool(true);
            }),
            b"\x80\x02\x88."
        );
        assert_eq!(
            one(|p| {
                p.bool(false);
            }),
            b"\x80\x02\x89."
        );
        assert_eq!(
            one(|p| {
                p.uint_tuple(&[]);
            }),
            b"\x80\x02)."
        );
    }

    #[test]
    fn negative_long1_keeps_its_sign_byte() {
        // -2^31 - 1 needs 5 bytes: 0xff_7f_ff_ff_ff little-endian.
        assert_eq!(
            one(|p| {
                p.int(-(1 << 31) - 1);
            }),
            b"\x80\x02\x8a\x05\xff\xff\xff\x7f\xff."
        );
        // -2^31 itself is a BININT.
        assert_eq!(
            one(|p| {
                p.int(-(1 << 31));
            }),
            b"\x80\x02J\x00\x00\x00\x80."
        );
    }

    #[test]
    fn strings_are_binunicode_with_utf8_length() {
        assert_eq!(
            one(|p| {
                p.str("ab");
            }),
            b"\x80\x02X\x02\x00\x00\x00ab."
        );
        let long = "x".repeat(300);
        let bytes = one(|p| {
            p.str(&long);
        });
        assert_eq!(&bytes[2..7], b"X\x2c\x01\x00\x00");
        assert_eq!(bytes.len(), 2 + 5 + 300 + 1);
        assert_eq!(
            one(|p| {
                p.str("é");
            }),
            b"\x80\x02X\x02\x00\x00\x00\xc3\xa9."
        );
    }

    #[test]
    fn containers_and_objects() {
        let bytes = one(|p| {
            p.global("torch", "Size")
                .uint_tuple(&[2, 3])
                .tuple1()
                .reduce();
        });
        assert_eq!(bytes, b"\x80\x02ctorch\nSize\n(K\x02K\x03t\x85R.");
        let bytes = one(|p| {
            p.global("m", "C").empty_tuple().newobj();
            p.empty_dict()
                .mark()
                .str("a")
                .empty_list()
                .mark()
                .int(1)
                .appends();
            p.setitems().build();
        });
        assert_eq!(
            bytes,
            b"\x80\x02cm\nC\n)\x81}(X\x01\x00\x00\x00a](K\x01eub."
        );
        assert_eq!(
            one(|p| {
                p.mark().str("s").tuple().binpersid();
            }),
            { b"\x80\x02(X\x01\x00\x00\x00stQ.".to_vec() }
        );
    }
}
