//! A safe pickle reader: a small stack machine that builds a [`Value`] tree and executes nothing.
//!
//! torch writes its indexes as Python pickles: DCP's `.metadata` (protocol 4 or 5, with FRAME,
//! STACK_GLOBAL and MEMOIZE) and the `data.pkl` of every torch.save archive (protocol 2, with
//! GLOBAL and BINPUT). Python's own unpickler would import and call whatever the stream names;
//! this one only records it. A class reference becomes [`Value::Global`], a call becomes
//! [`Value::Reduce`], `cls.__new__` + `__setstate__` becomes [`Value::Object`], and a torch
//! storage reference becomes [`Value::PersistentId`]. The interpreters in [`crate::dcp`] and
//! [`crate::torch_save`] then decide what those mean.
//!
//! Only the opcodes torch emits with protocols 2 to 5 are accepted (see
//! `tests/fixtures/dcp/FORMAT.md` §2–3); anything else, a bad memo index, a stack underflow, a
//! truncated stream, a nesting deeper than [`MAX_DEPTH`] or a tree larger than the input can
//! justify is a [`PickleError`] with the byte offset and opcode. Work and memory are bounded by
//! the input length: every declared length is checked against the bytes that remain before
//! anything is allocated, every opcode creates at most one node, and turning the memo's shared
//! nodes into a tree is charged against a budget proportional to the input (so a stream that
//! references one big object a million times is refused rather than expanded).
//!
//! One piece of interpretation happens here, because pickle itself needs it to make sense of
//! what follows: `collections.OrderedDict` called with no arguments (or with a list of pairs)
//! becomes a [`Value::Dict`], so that the SETITEMS torch emits after it can fill it. It is a
//! plain ordered map either way; nothing is called.

use std::collections::HashMap;

/// Deepest nesting of containers and objects accepted. torch's deepest structure (Metadata →
/// dict → TensorStorageMetadata → list → ChunkStorageMetadata → Size → tuple) is about 10 deep.
pub const MAX_DEPTH: usize = 200;

/// Bytes a decoded tree may occupy per input byte (plus 1 MiB), see [`parse`].
pub const BUDGET_BYTES_PER_INPUT_BYTE: u64 = 128;

/// A node of a decoded pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An int that fits in i64 (LONG1 of up to 8 bytes; larger ones are refused).
    Int(i64),
    /// A float (BINFLOAT).
    Float(f64),
    /// A str.
    Str(String),
    /// A bytes object (BINBYTES / SHORT_BINBYTES).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict (or `collections.OrderedDict`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A reference to `module.name` (a class or function), never imported.
    Global {
        /// The module path.
        module: String,
        /// The attribute name.
        name: String,
    },
    /// `callable(*args)` (REDUCE), never called.
    Reduce {
        /// What would be called (usually a [`Value::Global`]).
        callable: Box<Value>,
        /// The argument tuple.
        args: Box<Value>,
    },
    /// An instance: `class.__new__(class, *args)` (NEWOBJ) followed by `__setstate__(state)`
    /// (BUILD). A BUILD applied to a REDUCE result also gives an `Object`, whose `args` are then
    /// the constructor's arguments.
    Object {
        /// The class (usually a [`Value::Global`]).
        class: Box<Value>,
        /// The arguments of `__new__` (NEWOBJ) or of the constructor call (REDUCE + BUILD).
        args: Box<Value>,
        /// The BUILD state, if any (a dict, or a tuple for classes with `__setstate__`).
        state: Option<Box<Value>>,
    },
    /// A persistent id (BINPERSID); torch uses it for storages.
    PersistentId(Box<Value>),
}

impl Value {
    /// The string, if this is a [`Value::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The int, if this is a [`Value::Int`] (a bool is not an int here).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The `(module, name)` if this is a [`Value::Global`].
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// A short description for error messages (`"dict of 3"`, `"global torch.Size"`).
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {:?}", truncate(s)),
            Value::Bytes(b) => format!("bytes of {}", b.len()),
            Value::Tuple(v) => format!("tuple of {}", v.len()),
            Value::List(v) => format!("list of {}", v.len()),
            Value::Dict(v) => format!("dict of {}", v.len()),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Reduce { callable, .. } => format!("call of {}", callable.describe()),
            Value::Object { class, .. } => format!("object of {}", class.describe()),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickleErrorKind {
    /// An opcode outside the set torch writes (or not a pickle opcode at all).
    #[error("unsupported opcode")]
    UnsupportedOpcode,
    /// A protocol number outside 2..=5.
    #[error("unsupported protocol {0}")]
    UnsupportedProtocol(u8),
    /// The stream ends inside an opcode or before STOP.
    #[error("truncated stream")]
    Truncated,
    /// An opcode needs more stack items than there are.
    #[error("stack underflow")]
    StackUnderflow,
    /// An opcode that collects items up to a MARK found none.
    #[error("no MARK on the stack")]
    NoMark,
    /// A memo GET of an index that was never PUT.
    #[error("memo index {0} was never stored")]
    BadMemo(u64),
    /// A stack item has the wrong kind for the opcode (APPEND onto a tuple, ...).
    #[error("expected {expected}, found {found}")]
    WrongType {
        /// What the opcode needs.
        expected: &'static str,
        /// What it got.
        found: String,
    },
    /// A LONG1 integer wider than 8 bytes.
    #[error("integer of {0} bytes does not fit in 64 bits")]
    IntTooLarge(usize),
    /// A string that is not UTF-8, or a GLOBAL line that is not.
    #[error("invalid UTF-8 in a string")]
    BadUtf8,
    /// Nesting deeper than [`MAX_DEPTH`] (or a cycle).
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// The decoded tree would be far larger than the input (shared objects referenced many
    /// times).
    #[error("decoded structure is too large for a {0}-byte pickle")]
    TooLarge(u64),
    /// STOP left more or fewer than one item on the stack.
    #[error("STOP with {0} items on the stack instead of 1")]
    BadStop(usize),
}

/// A refused pickle: where, on which opcode, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at byte {offset}{}: {kind}", opcode.map(|op| format!(" (opcode 0x{op:02x} {})", opcode_name(op))).unwrap_or_default())]
pub struct PickleError {
    /// Byte offset of the opcode in the stream.
    pub offset: u64,
    /// The opcode byte, when there is one.
    pub opcode: Option<u8>,
    /// What is wrong.
    pub kind: PickleErrorKind,
}

/// Decodes a pickle. Executes nothing; see the module docs for what is accepted.
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    let mut vm = Vm {
        input: bytes,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
        op_start: 0,
        op: None,
    };
    let root = vm.run()?;
    // Budget: the bytes the tree may occupy. torch's .metadata decodes to 13-17x its size (a
    // 1-byte opcode becomes a whole `Value`; memo GETs re-expand small shared objects), see
    // `real_metadata_stays_far_inside_the_expansion_budget`; 128x leaves a wide margin while
    // still refusing a stream that references one big object a million times.
    let budget = (bytes.len() as u64)
        .saturating_mul(BUDGET_BYTES_PER_INPUT_BYTE)
        .saturating_add(1 << 20);
    let mut spent = 0u64;
    vm.materialize(root, 0, &mut spent, budget)
        .map_err(|kind| PickleError {
            offset: bytes.len() as u64,
            opcode: None,
            kind,
        })
}

type NodeId = usize;

#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<NodeId>),
    List(Vec<NodeId>),
    Dict(Vec<(NodeId, NodeId)>),
    Global(String, String),
    Reduce(NodeId, NodeId),
    Object(NodeId, NodeId, Option<NodeId>),
    PersistentId(NodeId),
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Mark,
    Node(NodeId),
}

struct Vm<'a> {
    input: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u64, NodeId>,
    op_start: usize,
    op: Option<u8>,
}

type Step<T> = Result<T, PickleErrorKind>;

impl Vm<'_> {
    fn run(&mut self) -> Result<NodeId, PickleError> {
        loop {
            self.op_start = self.pos;
            self.op = None;
            let step = self.step();
            match step {
                Ok(Some(root)) => return Ok(root),
                Ok(None) => {}
                Err(kind) => {
                    return Err(PickleError {
                        offset: self.op_start as u64,
                        opcode: self.op,
                        kind,
                    })
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> Step<&[u8]> {
        let end = self.pos.checked_add(n).ok_or(PickleErrorKind::Truncated)?;
        let s = self
            .input
            .get(self.pos..end)
            .ok_or(PickleErrorKind::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Step<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Step<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length-prefixed payload; the length is checked against what remains before use.
    fn sized(&mut self, n: u64) -> Step<&[u8]> {
        let n = usize::try_from(n).map_err(|_| PickleErrorKind::Truncated)?;
        self.take(n)
    }

    fn line(&mut self) -> Step<String> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleErrorKind::Truncated)?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| PickleErrorKind::BadUtf8)?;
        let s = s.to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(bytes: &[u8]) -> Step<String> {
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| PickleErrorKind::BadUtf8)
    }

    fn push_node(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(Slot::Node(self.nodes.len() - 1));
    }

    fn pop(&mut self) -> Step<NodeId> {
        match self.stack.pop() {
            Some(Slot::Node(id)) => Ok(id),
            Some(Slot::Mark) => Err(PickleErrorKind::WrongType {
                expected: "a value",
                found: "MARK".into(),
            }),
            None => Err(PickleErrorKind::StackUnderflow),
        }
    }

    fn top(&self) -> Step<NodeId> {
        match self.stack.last() {
            Some(Slot::Node(id)) => Ok(*id),
            Some(Slot::Mark) => Err(PickleErrorKind::WrongType {
                expected: "a value",
                found: "MARK".into(),
            }),
            None => Err(PickleErrorKind::StackUnderflow),
        }
    }

    /// Pops everything above the topmost MARK, and the MARK.
    fn pop_mark(&mut self) -> Step<Vec<NodeId>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or(PickleErrorKind::NoMark)?;
        let items = self.stack[at + 1..]
            .iter()
            .map(|s| match s {
                Slot::Node(id) => *id,
                Slot::Mark => unreachable!("rposition found the topmost MARK"),
            })
            .collect();
        self.stack.truncate(at);
        Ok(items)
    }

    fn memo_get(&mut self, idx: u64) -> Step<()> {
        let id = *self.memo.get(&idx).ok_or(PickleErrorKind::BadMemo(idx))?;
        self.stack.push(Slot::Node(id));
        Ok(())
    }

    fn memo_put(&mut self, idx: u64) -> Step<()> {
        let id = self.top()?;
        self.memo.insert(idx, id);
        Ok(())
    }

    fn kind_of(&self, id: NodeId) -> String {
        match &self.nodes[id] {
            Node::None => "None",
            Node::Bool(_) => "bool",
            Node::Int(_) => "int",
            Node::Float(_) => "float",
            Node::Str(_) => "str",
            Node::Bytes(_) => "bytes",
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Global(..) => "global",
            Node::Reduce(..) => "call result",
            Node::Object(..) => "object",
            Node::PersistentId(_) => "persistent id",
        }
        .to_string()
    }

    fn tuple_of(&mut self, items: Vec<NodeId>) {
        self.push_node(Node::Tuple(items));
    }

    fn step(&mut self) -> Step<Option<NodeId>> {
        let op = self.u8()?;
        self.op = Some(op);
        match op {
            // PROTO
            0x80 => {
                let v = self.u8()?;
                if !(2..=5).contains(&v) {
                    return Err(PickleErrorKind::UnsupportedProtocol(v));
                }
            }
            // FRAME: only a hint for buffered readers; check it fits and read on.
            0x95 => {
                let n = self.u64()?;
                if n > (self.input.len() - self.pos) as u64 {
                    return Err(PickleErrorKind::Truncated);
                }
            }
            // STOP
            b'.' => {
                if self.stack.len() != 1 {
                    return Err(PickleErrorKind::BadStop(self.stack.len()));
                }
                return self.pop().map(Some);
            }
            // GLOBAL "module\nname\n"
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_node(Node::Global(module, name));
            }
            // STACK_GLOBAL
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Node::Str(m), Node::Str(n)) = (&self.nodes[module], &self.nodes[name]) else {
                    return Err(PickleErrorKind::WrongType {
                        expected: "two strings",
                        found: format!("{} and {}", self.kind_of(module), self.kind_of(name)),
                    });
                };
                let node = Node::Global(m.clone(), n.clone());
                self.push_node(node);
            }
            // MEMOIZE, BINPUT, LONG_BINPUT
            0x94 => {
                let idx = self.memo.len() as u64;
                self.memo_put(idx)?;
            }
            b'q' => {
                let idx = self.u8()? as u64;
                self.memo_put(idx)?;
            }
            b'r' => {
                let idx = self.u32()? as u64;
                self.memo_put(idx)?;
            }
            // BINGET, LONG_BINGET
            b'h' => {
                let idx = self.u8()? as u64;
                self.memo_get(idx)?;
            }
            b'j' => {
                let idx = self.u32()? as u64;
                self.memo_get(idx)?;
            }
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c | b'X' | 0x8d => {
                let n = match op {
                    0x8c => self.u8()? as u64,
                    b'X' => self.u32()? as u64,
                    _ => self.u64()?,
                };
                let s = Self::utf8(self.sized(n)?)?;
                self.push_node(Node::Str(s));
            }
            // SHORT_BINBYTES, BINBYTES, BINBYTES8
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => self.u8()? as u64,
                    b'B' => self.u32()? as u64,
                    _ => self.u64()?,
                };
                let b = self.sized(n)?.to_vec();
                self.push_node(Node::Bytes(b));
            }
            // BININT1, BININT2, BININT
            b'K' => {
                let v = self.u8()? as i64;
                self.push_node(Node::Int(v));
            }
            b'M' => {
                let v = self.u16()? as i64;
                self.push_node(Node::Int(v));
            }
            b'J' => {
                let v = self.u32()? as i32 as i64;
                self.push_node(Node::Int(v));
            }
            // LONG1: little-endian two's complement of n bytes.
            0x8a => {
                let n = self.u8()? as usize;
                if n > 8 {
                    return Err(PickleErrorKind::IntTooLarge(n));
                }
                let b = self.take(n)?;
                let mut v: i64 = 0;
                if n > 0 {
                    let mut full = if b[n - 1] & 0x80 != 0 {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    full[..n].copy_from_slice(b);
                    v = i64::from_le_bytes(full);
                }
                self.push_node(Node::Int(v));
            }
            // BINFLOAT: big-endian f64.
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.push_node(Node::Float(f64::from_be_bytes(a)));
            }
            b'N' => self.push_node(Node::None),
            0x88 => self.push_node(Node::Bool(true)),
            0x89 => self.push_node(Node::Bool(false)),
            // MARK
            b'(' => self.stack.push(Slot::Mark),
            // EMPTY_TUPLE, TUPLE1..3, TUPLE
            b')' => self.tuple_of(Vec::new()),
            0x85 => {
                let a = self.pop()?;
                self.tuple_of(vec![a]);
            }
            0x86 => {
                let b = self.pop()?;
                let a = self.pop()?;
                self.tuple_of(vec![a, b]);
            }
            0x87 => {
                let c = self.pop()?;
                let b = self.pop()?;
                let a = self.pop()?;
                self.tuple_of(vec![a, b, c]);
            }
            b't' => {
                let items = self.pop_mark()?;
                self.tuple_of(items);
            }
            // EMPTY_LIST, APPEND, APPENDS
            b']' => self.push_node(Node::List(Vec::new())),
            b'a' => {
                let v = self.pop()?;
                let list = self.top()?;
                self.list_mut(list)?.push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                let list = self.top()?;
                self.list_mut(list)?.extend(items);
            }
            // EMPTY_DICT, SETITEM, SETITEMS
            b'}' => self.push_node(Node::Dict(Vec::new())),
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let dict = self.top()?;
                self.dict_mut(dict)?.push((k, v));
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(PickleErrorKind::WrongType {
                        expected: "key/value pairs",
                        found: format!("{} items", items.len()),
                    });
                }
                let dict = self.top()?;
                let pairs = items.chunks_exact(2).map(|p| (p[0], p[1]));
                self.dict_mut(dict)?.extend(pairs);
            }
            // REDUCE
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                if !matches!(self.nodes[args], Node::Tuple(_)) {
                    return Err(PickleErrorKind::WrongType {
                        expected: "an argument tuple",
                        found: self.kind_of(args),
                    });
                }
                let node = self.reduce(callable, args);
                self.push_node(node);
            }
            // NEWOBJ
            0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                if !matches!(self.nodes[args], Node::Tuple(_)) {
                    return Err(PickleErrorKind::WrongType {
                        expected: "an argument tuple",
                        found: self.kind_of(args),
                    });
                }
                self.push_node(Node::Object(class, args, None));
            }
            // BUILD
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                match self.nodes[target] {
                    Node::Object(_, _, ref mut s @ None) => *s = Some(state),
                    Node::Reduce(callable, args) => {
                        self.nodes[target] = Node::Object(callable, args, Some(state));
                    }
                    _ => {
                        return Err(PickleErrorKind::WrongType {
                            expected: "an object without state",
                            found: self.kind_of(target),
                        })
                    }
                }
            }
            // BINPERSID
            b'Q' => {
                let pid = self.pop()?;
                self.push_node(Node::PersistentId(pid));
            }
            _ => return Err(PickleErrorKind::UnsupportedOpcode),
        }
        Ok(None)
    }

    /// REDUCE, with the one interpretation pickle needs: `OrderedDict()` / `OrderedDict(pairs)`
    /// is a dict, so that SETITEMS can fill it.
    fn reduce(&self, callable: NodeId, args: NodeId) -> Node {
        if let (Node::Global(m, n), Node::Tuple(a)) = (&self.nodes[callable], &self.nodes[args]) {
            if m == "collections" && n == "OrderedDict" {
                match a.as_slice() {
                    [] => return Node::Dict(Vec::new()),
                    [list] => {
                        if let Node::List(items) = &self.nodes[*list] {
                            let pairs: Option<Vec<_>> = items
                                .iter()
                                .map(|&p| match &self.nodes[p] {
                                    Node::Tuple(kv) if kv.len() == 2 => Some((kv[0], kv[1])),
                                    _ => None,
                                })
                                .collect();
                            if let Some(pairs) = pairs {
                                return Node::Dict(pairs);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Node::Reduce(callable, args)
    }

    fn list_mut(&mut self, id: NodeId) -> Step<&mut Vec<NodeId>> {
        let found = self.kind_of(id);
        match &mut self.nodes[id] {
            Node::List(v) => Ok(v),
            _ => Err(PickleErrorKind::WrongType {
                expected: "a list",
                found,
            }),
        }
    }

    fn dict_mut(&mut self, id: NodeId) -> Step<&mut Vec<(NodeId, NodeId)>> {
        let found = self.kind_of(id);
        match &mut self.nodes[id] {
            Node::Dict(v) => Ok(v),
            _ => Err(PickleErrorKind::WrongType {
                expected: "a dict",
                found,
            }),
        }
    }

    /// Turns the node graph into a tree, charging every node and string byte against `budget`.
    /// Depth is capped, which also stops cycles (a list appended to itself).
    fn materialize(&self, id: NodeId, depth: usize, spent: &mut u64, budget: u64) -> Step<Value> {
        if depth > MAX_DEPTH {
            return Err(PickleErrorKind::TooDeep);
        }
        let node = &self.nodes[id];
        let heap = match node {
            Node::Str(s) => s.len(),
            Node::Bytes(b) => b.len(),
            Node::Global(m, n) => m.len() + n.len(),
            _ => 0,
        };
        *spent += (std::mem::size_of::<Value>() + heap) as u64;
        if *spent > budget {
            return Err(PickleErrorKind::TooLarge(self.input.len() as u64));
        }
        let sub = |id: NodeId, spent: &mut u64| self.materialize(id, depth + 1, spent, budget);
        let many = |ids: &[NodeId], spent: &mut u64| -> Step<Vec<Value>> {
            ids.iter().map(|&i| sub(i, spent)).collect()
        };
        Ok(match node {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::Float(f) => Value::Float(*f),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Bytes(b) => Value::Bytes(b.clone()),
            Node::Tuple(v) => Value::Tuple(many(v, spent)?),
            Node::List(v) => Value::List(many(v, spent)?),
            Node::Dict(v) => Value::Dict(
                v.iter()
                    .map(|&(k, x)| Ok((sub(k, spent)?, sub(x, spent)?)))
                    .collect::<Step<_>>()?,
            ),
            Node::Global(m, n) => Value::Global {
                module: m.clone(),
                name: n.clone(),
            },
            Node::Reduce(c, a) => Value::Reduce {
                callable: Box::new(sub(*c, spent)?),
                args: Box::new(sub(*a, spent)?),
            },
            Node::Object(c, a, s) => Value::Object {
                class: Box::new(sub(*c, spent)?),
                args: Box::new(sub(*a, spent)?),
                state: match s {
                    Some(s) => Some(Box::new(sub(*s, spent)?)),
                    None => None,
                },
            },
            Node::PersistentId(p) => Value::PersistentId(Box::new(sub(*p, spent)?)),
        })
    }
}

/// The pickletools name of an opcode, for error messages.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        0x8c => "SHORT_BINUNICODE",
        b'X' => "BINUNICODE",
        0x8d => "BINUNICODE8",
        b'C' => "SHORT_BINBYTES",
        b'B' => "BINBYTES",
        0x8e => "BINBYTES8",
        b'K' => "BININT1",
        b'M' => "BININT2",
        b'J' => "BININT",
        0x8a => "LONG1",
        b'G' => "BINFLOAT",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'(' => "MARK",
        b')' => "EMPTY_TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b't' => "TUPLE",
        b']' => "EMPTY_LIST",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'}' => "EMPTY_DICT",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        // Real pickle opcodes we refuse, named so the error says what the stream wanted.
        0x8b => "LONG4",
        b'P' => "PERSID",
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'U' => "SHORT_BINSTRING",
        b'T' => "BINSTRING",
        b'p' => "PUT",
        b'g' => "GET",
        b'd' => "DICT",
        b'l' => "LIST",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        _ => "not a pickle opcode",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(bytes: &[u8]) -> PickleError {
        parse(bytes).expect_err("must be refused")
    }

    #[test]
    fn reads_protocol2_scalars_and_containers() {
        // {'a': [1, -2, 300, 70000, True, None, 1.5], 'b': (b'xy', 2**40)}
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'(',
        ];
        p.extend([b'K', 1, b'J', 0xfe, 0xff, 0xff, 0xff, b'M', 0x2c, 1]);
        p.extend([b'J', 0x70, 0x11, 1, 0, 0x88, b'N', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([b'e', 0x8c, 1, b'b', b'C', 2, b'x', b'y']);
        p.extend([0x8a, 6, 0, 0, 0, 0, 0, 1, 0x86, b'u', b'.']);
        let v = parse(&p).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::List(vec![
                        Value::Int(1),
                        Value::Int(-2),
                        Value::Int(300),
                        Value::Int(70000),
                        Value::Bool(true),
                        Value::None,
                        Value::Float(1.5),
                    ])
                ),
                (
                    Value::Str("b".into()),
                    Value::Tuple(vec![Value::Bytes(b"xy".to_vec()), Value::Int(1 << 40)])
                ),
            ])
        );
    }

    #[test]
    fn long1_sign_extends_and_refuses_wide_ints() {
        assert_eq!(
            parse(&[0x80, 2, 0x8a, 1, 0xff, b'.']).unwrap(),
            Value::Int(-1)
        );
        assert_eq!(parse(&[0x80, 2, 0x8a, 0, b'.']).unwrap(), Value::Int(0));
        let mut p = vec![0x80, 2, 0x8a, 9];
        p.extend([0; 9]);
        p.push(b'.');
        assert_eq!(err(&p).kind, PickleErrorKind::IntTooLarge(9));
    }

    #[test]
    fn memo_shares_mutated_objects() {
        // x = []; [x, x] where x is appended to after being memoized: both copies see it.
        let p = [0x80, 2, b']', b'q', 0, b'K', 7, b'a', b'h', 0, 0x86, b'.'];
        let v = parse(&p).unwrap();
        let one = Value::List(vec![Value::Int(7)]);
        assert_eq!(v, Value::Tuple(vec![one.clone(), one]));
    }

    #[test]
    fn globals_newobj_build_and_reduce_are_recorded_not_run() {
        // os.system('x') via REDUCE; a NEWOBJ object with BUILD state; BUILD on a REDUCE.
        let mut p = vec![0x80, 2, b'('];
        p.extend(b"cos\nsystem\n");
        p.extend([0x8c, 1, b'x', 0x85, b'R']);
        p.extend(b"cm\nC\n");
        p.extend([b')', 0x81, b'}', b'b']);
        p.extend(b"cm\nD\n");
        p.extend([b')', b'R', b'K', 3, b'b', b't', b'.']);
        let v = parse(&p).unwrap();
        let g = |m: &str, n: &str| {
            Box::new(Value::Global {
                module: m.into(),
                name: n.into(),
            })
        };
        assert_eq!(
            v,
            Value::Tuple(vec![
                Value::Reduce {
                    callable: g("os", "system"),
                    args: Box::new(Value::Tuple(vec![Value::Str("x".into())])),
                },
                Value::Object {
                    class: g("m", "C"),
                    args: Box::new(Value::Tuple(vec![])),
                    state: Some(Box::new(Value::Dict(vec![]))),
                },
                Value::Object {
                    class: g("m", "D"),
                    args: Box::new(Value::Tuple(vec![])),
                    state: Some(Box::new(Value::Int(3))),
                },
            ])
        );
    }

    #[test]
    fn ordered_dict_becomes_a_dict() {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\n");
        p.extend([b')', b'R', b'K', 1, b'K', 2, b's', b'.']);
        assert_eq!(
            parse(&p).unwrap(),
            Value::Dict(vec![(Value::Int(1), Value::Int(2))])
        );
    }

    #[test]
    fn refusals_carry_offset_opcode_and_kind() {
        let e = err(&[0x80, 2, b'K', 1, b'0', b'.']);
        assert_eq!((e.offset, e.opcode), (4, Some(b'0')));
        assert_eq!(e.kind, PickleErrorKind::UnsupportedOpcode);
        assert!(e.to_string().contains("POP"), "{e}");
        assert_eq!(
            err(&[0x80, 2, b'h', 3, b'.']).kind,
            PickleErrorKind::BadMemo(3)
        );
        assert_eq!(
            err(&[0x80, 2, b'a', b'.']).kind,
            PickleErrorKind::StackUnderflow
        );
        assert_eq!(err(&[0x80, 2, b'K']).kind, PickleErrorKind::Truncated);
        assert_eq!(err(&[0x80, 2, b'K', 1]).kind, PickleErrorKind::Truncated);
        assert_eq!(
            err(&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a']).kind,
            PickleErrorKind::Truncated
        );
        assert_eq!(
            err(&[0x80, 9, b'N', b'.']).kind,
            PickleErrorKind::UnsupportedProtocol(9)
        );
        assert_eq!(err(&[0x80, 2, b'e', b'.']).kind, PickleErrorKind::NoMark);
        assert_eq!(
            err(&[0x80, 2, b'N', b'N', b'.']).kind,
            PickleErrorKind::BadStop(2)
        );
    }

    #[test]
    fn deep_nesting_and_cycles_are_refused() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', MAX_DEPTH + 5));
        p.extend(std::iter::repeat_n(b'a', MAX_DEPTH + 4));
        p.push(b'.');
        assert_eq!(err(&p).kind, PickleErrorKind::TooDeep);
        // l = []; l.append(l)
        let p = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
        assert_eq!(err(&p).kind, PickleErrorKind::TooDeep);
    }

    #[test]
    fn shared_expansion_is_bounded() {
        // A doubling chain: t0 = 'x'*200; t(i+1) = (ti, ti). 40 levels would be 2^40 strings.
        let mut p = vec![0x80, 2, b'X', 200, 0, 0, 0];
        p.extend([b'x'; 200]);
        for _ in 0..40 {
            p.extend([b'q', 0, b'h', 0, 0x86]);
        }
        p.push(b'.');
        assert!(matches!(err(&p).kind, PickleErrorKind::TooLarge(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn opcode_soup_never_panics(ops in proptest::collection::vec(
            prop::sample::select(b"\x80\x02\x95(tu}]ae)\x85\x86\x87KMJhjq\x94\x93\x8cXNR\x81bQs.\x88\x89G\x8a".to_vec()), 0..200)) {
            let _ = parse(&ops);
        }
    }
}
