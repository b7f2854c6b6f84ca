//! A small pickle interpreter that knows only what a PyTorch tensor state dict needs.
//!
//! A pickle is a program for a stack machine; Python's `pickle.load` runs it and calls
//! whatever functions it names. This interpreter runs it without calling anything: it
//! implements the opcodes of protocols 2 to 5 that `torch.save` writes for dicts, lists,
//! tuples, numbers, strings and tensors, and recognizes a short whitelist of globals
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and its relatives, the
//! `torch.*Storage` types, the `torch` dtypes). Any other global, opcode or persistent
//! id is refused by name. Containers live in an arena and are referred to by index, so
//! a memo reference (`BINGET`) is O(1) and cycles cannot leak; the stack, the memo, the
//! arena and the mark stack are bounded, and nothing here recurses.

use std::collections::HashMap;
use std::rc::Rc;

use safetensors::Dtype;

/// Most values on the stack, entries in the memo, or containers in the arena.
const MAX_ITEMS: usize = 1 << 20;
/// Most nested MARKs open at once.
const MAX_MARKS: usize = 4096;
/// Most dimensions of a tensor.
pub(crate) const MAX_DIMS: usize = 64;

/// A value of the pickle machine.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer wider than 64 bits (kept opaque).
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    /// A list, tuple or dict in the arena.
    Obj(usize),
    /// A whitelisted global.
    Global(Global),
    /// A tensor in [`Program::tensors`].
    Tensor(usize),
    /// A storage in [`Program::storages`].
    Storage(usize),
}

/// The whitelisted globals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` or `torch.nn.parameter.Parameter` (the type argument of
    /// `_rebuild_from_type_v2`).
    TensorType,
    /// A `torch.*Storage` type: its element dtype (`None` for a dtype safetensors lacks).
    StorageType(Option<Dtype>, &'static str),
    /// `torch.storage.UntypedStorage` (bytes).
    UntypedStorage,
    /// A `torch.<dtype>` object.
    DtypeObject(Option<Dtype>),
}

/// A container of the arena.
#[derive(Debug)]
pub(crate) enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Key-value pairs in insertion order (a key set twice appears twice; the last wins).
    Dict(Vec<(Value, Value)>),
}

/// A storage named by a persistent id: `('storage', type, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    /// The record name under `<archive>/data/`.
    pub key: String,
    /// The element dtype (`None` for one safetensors lacks).
    pub dtype: Option<Dtype>,
    /// The name of its storage type, for messages.
    pub type_name: &'static str,
    /// Elements the storage holds.
    pub numel: usize,
}

/// A tensor rebuilt from a storage: a view (offset, size, stride, in elements).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    /// Index into [`Program::storages`].
    pub storage: usize,
    /// First element.
    pub offset: usize,
    /// The shape.
    pub size: Vec<usize>,
    /// The stride of each dimension, in elements.
    pub stride: Vec<usize>,
}

/// The result of running a pickle: its value and the arena it refers to.
#[derive(Debug, Default)]
pub(crate) struct Program {
    pub objs: Vec<Obj>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorRef>,
}

/// Why a pickle was refused (the caller adds the file format).
pub(crate) type Refusal = String;

type R<T> = std::result::Result<T, Refusal>;

struct Machine<'a> {
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    prog: Program,
    storage_index: HashMap<(String, &'static str), usize>,
}

/// Runs `code` and returns the value it leaves (at `STOP`) and the arena.
pub(crate) fn run(code: &[u8]) -> R<(Value, Program)> {
    let mut m = Machine {
        code,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        prog: Program::default(),
        storage_index: HashMap::new(),
    };
    let v = m.exec()?;
    Ok((v, m.prog))
}

fn opname(op: u8) -> String {
    let name = match op {
        b'c' => "GLOBAL",
        b'\x93' => "STACK_GLOBAL",
        b'i' => "INST",
        b'o' => "OBJ",
        b'R' => "REDUCE",
        b'\x81' => "NEWOBJ",
        b'\x92' => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'\x82' | b'\x83' | b'\x84' => "EXT",
        b'\x8f' => "EMPTY_SET",
        b'\x90' => "ADDITEMS",
        b'\x91' => "FROZENSET",
        b'\x97' => "NEXT_BUFFER",
        b'\x98' => "READONLY_BUFFER",
        b'S' | b'T' | b'U' => "a protocol-0/1 string opcode",
        b'I' | b'L' | b'F' | b'V' | b'p' | b'g' | b'l' | b'd' | b'a' | b's' => {
            "a protocol-0 text opcode"
        }
        _ => "",
    };
    if name.is_empty() {
        format!("opcode 0x{op:02x}")
    } else {
        format!("opcode 0x{op:02x} ({name})")
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.code.len())
            .ok_or_else(|| {
                format!(
                    "the pickle is truncated: an opcode at byte {} needs {n} more bytes, {} remain",
                    self.pos,
                    self.code.len() - self.pos
                )
            })?;
        let s = &self.code[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn len64(&mut self) -> R<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| format!("a length of {n} bytes does not fit memory"))
    }

    /// A text line (GLOBAL's module and name), without its newline.
    fn line(&mut self) -> R<String> {
        let rest = &self.code[self.pos..];
        let n = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or_else(|| {
                format!(
                    "GLOBAL at byte {} has no name line (at most 256 bytes)",
                    self.pos
                )
            })?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("GLOBAL at byte {} names a non-UTF-8 module", self.pos))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> R<Value> {
        let at = self.pos;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| format!("the string at byte {at} is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn bytes(&mut self, n: usize) -> R<Value> {
        self.take(n)?;
        Ok(Value::Bytes)
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= MAX_ITEMS {
            return Err(format!(
                "the pickle's stack exceeds {MAX_ITEMS} values; a state dict never needs that"
            ));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!(
                "the pickle pops an empty stack at byte {}",
                self.pos
            ));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&mut self) -> R<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!(
                "the pickle reads an empty stack at byte {}",
                self.pos
            ));
        }
        Ok(self.stack.last_mut().expect("checked above"))
    }

    /// The values pushed since the last MARK (which is removed).
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| {
            format!(
                "the pickle ends a MARK that was never set, at byte {}",
                self.pos
            )
        })?;
        Ok(self.stack.split_off(m))
    }

    fn new_obj(&mut self, o: Obj) -> R<Value> {
        if self.prog.objs.len() >= MAX_ITEMS {
            return Err(format!(
                "the pickle builds more than {MAX_ITEMS} containers; a state dict never needs \
                 that"
            ));
        }
        self.prog.objs.push(o);
        Ok(Value::Obj(self.prog.objs.len() - 1))
    }

    fn memo_put(&mut self, k: u32) -> R<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_ITEMS && !self.memo.contains_key(&k) {
            return Err(format!("the pickle's memo exceeds {MAX_ITEMS} entries"));
        }
        self.memo.insert(k, v);
        Ok(())
    }

    fn memo_get(&mut self, k: u32) -> R<()> {
        let v =
            self.memo.get(&k).cloned().ok_or_else(|| {
                format!("the pickle reads memo entry {k}, which was never stored")
            })?;
        self.push(v)
    }

    fn tuple(&mut self, items: Vec<Value>) -> R<()> {
        let v = self.new_obj(Obj::Tuple(items))?;
        self.push(v)
    }

    fn container(&mut self, v: &Value) -> R<&mut Obj> {
        match v {
            Value::Obj(i) => Ok(&mut self.prog.objs[*i]),
            other => Err(format!(
                "the pickle adds items to {}, which is not a list or dict",
                describe(other)
            )),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        let target = self.top()?.clone();
        match self.container(&target)? {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err("the pickle appends to something that is not a list".into()),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let target = self.top()?.clone();
        match self.container(&target)? {
            Obj::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            _ => Err("the pickle sets items of something that is not a dict".into()),
        }
    }

    fn tuple_items(&self, v: &Value, what: &str) -> R<Vec<Value>> {
        match v {
            Value::Obj(i) => match &self.prog.objs[*i] {
                Obj::Tuple(t) => Ok(t.clone()),
                _ => Err(format!("{what} is not a tuple")),
            },
            other => Err(format!("{what} is {}, not a tuple", describe(other))),
        }
    }

    fn exec(&mut self) -> R<Value> {
        loop {
            let at = self.pos;
            let op = self
                .u8()
                .map_err(|_| "the pickle ends without STOP (truncated)".to_string())?;
            match op {
                // PROTO
                b'\x80' => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("pickle protocol {p} (bnorm reads 2 to 5)"));
                    }
                }
                // FRAME: a length hint only.
                b'\x95' => {
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    if !self.marks.is_empty() {
                        return Err("the pickle stops with a MARK still open".into());
                    }
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(format!(
                            "the pickle nests more than {MAX_MARKS} MARKs; a state dict never \
                             needs that"
                        ));
                    }
                    self.marks.push(self.stack.len());
                }
                b'N' => self.push(Value::None)?,
                b'\x88' => self.push(Value::Bool)?,
                b'\x89' => self.push(Value::Bool)?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                b'\x8a' => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = if n == 0 {
                        Value::Int(0)
                    } else if n <= 8 {
                        let fill = if b[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut a = [fill; 8];
                        a[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(a))
                    } else {
                        Value::BigInt
                    };
                    self.push(v)?
                }
                b'\x8b' => {
                    // LONG4
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.push(Value::BigInt)?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'\x8c' => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'\x8d' => {
                    let n = self.len64()?;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v)?
                }
                b'\x8e' | b'\x96' => {
                    let n = self.len64()?;
                    let v = self.bytes(n)?;
                    self.push(v)?
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Vec::new()))?;
                    self.push(v)?
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()))?;
                    self.push(v)?
                }
                b')' => self.tuple(Vec::new())?,
                b'\x85' => {
                    let a = self.pop()?;
                    self.tuple(vec![a])?
                }
                b'\x86' => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.tuple(vec![a, b])?
                }
                b'\x87' => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.tuple(vec![a, b, c])?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::List(items))?;
                    self.push(v)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return Err("DICT with an odd number of values".into());
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    let v = self.new_obj(Obj::Dict(pairs))?;
                    self.push(v)?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                b'\x94' => {
                    let k = u32::try_from(self.memo.len())
                        .map_err(|_| "the pickle's memo overflows".to_string())?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = global(&module, &name)?;
                    self.push(Value::Global(g))?
                }
                b'\x93' => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(
                            "STACK_GLOBAL with a module or name that is not a string".into()
                        );
                    };
                    let g = global(module, name)?;
                    self.push(Value::Global(g))?
                }
                b'R' | b'\x81' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let args = self.tuple_items(&args, "the arguments of a call")?;
                    let v = self.call(&f, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: __setstate__ / __dict__ update. The whitelisted objects carry
                    // nothing bnorm needs in it (an OrderedDict's `_metadata`, a tensor's
                    // Python attributes), so the state is dropped, never applied.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Obj(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(format!(
                                "BUILD on {}, which a state dict never does",
                                describe(other)
                            ))
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(&pid)?;
                    self.push(v)?
                }
                other => {
                    return Err(format!(
                        "the pickle uses {} at byte {at}, which a tensor state dict never needs",
                        opname(other)
                    ))
                }
            }
        }
    }

    /// BINPERSID: `('storage', storage_type, key, location, numel)`.
    fn persistent(&mut self, pid: &Value) -> R<Value> {
        let items = self.tuple_items(pid, "a persistent id")?;
        let [tag, ty, key, _location, numel] = items.as_slice() else {
            return Err(format!(
                "a persistent id has {} fields, not the 5 of ('storage', type, key, location, \
                 numel)",
                items.len()
            ));
        };
        match tag {
            Value::Str(s) if &**s == "storage" => {}
            other => {
                return Err(format!(
                    "a persistent id of kind {}, not 'storage'",
                    describe(other)
                ))
            }
        }
        let (dtype, type_name) = match ty {
            Value::Global(Global::StorageType(d, name)) => (*d, *name),
            Value::Global(Global::UntypedStorage) => (Some(Dtype::U8), "UntypedStorage"),
            Value::Global(Global::DtypeObject(d)) => (*d, "a storage of a torch dtype"),
            other => {
                return Err(format!(
                    "a storage whose type is {}, not a torch storage type",
                    describe(other)
                ))
            }
        };
        let Value::Str(key) = key else {
            return Err("a storage whose key is not a string".into());
        };
        if key.is_empty() || key.len() > 64 || key.contains(['/', '\\']) || key.contains("..") {
            return Err(format!("a storage key {key:?} that names no record"));
        }
        let numel = match numel {
            Value::Int(n) => {
                usize::try_from(*n).map_err(|_| format!("storage {key} claims {n} elements"))?
            }
            other => {
                return Err(format!(
                    "storage {key} has a size that is {}",
                    describe(other)
                ))
            }
        };
        let id = (key.to_string(), type_name);
        if let Some(&i) = self.storage_index.get(&id) {
            if self.prog.storages[i].numel != numel {
                return Err(format!(
                    "storage {key} is named twice with different sizes ({} and {numel})",
                    self.prog.storages[i].numel
                ));
            }
            return Ok(Value::Storage(i));
        }
        if self.prog.storages.len() >= MAX_ITEMS {
            return Err(format!("the pickle names more than {MAX_ITEMS} storages"));
        }
        self.prog.storages.push(StorageRef {
            key: key.to_string(),
            dtype,
            type_name,
            numel,
        });
        let i = self.prog.storages.len() - 1;
        self.storage_index.insert(id, i);
        Ok(Value::Storage(i))
    }

    fn call(&mut self, f: &Value, args: Vec<Value>) -> R<Value> {
        let Value::Global(g) = f else {
            return Err(format!(
                "the pickle calls {}, which is not a function",
                describe(f)
            ));
        };
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err("OrderedDict called with arguments".into());
                }
                self.new_obj(Obj::Dict(Vec::new()))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => self.rebuild_tensor(&args),
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter called without a tensor".into()),
            },
            Global::RebuildFromTypeV2 => {
                // (func, type, args, state): a tensor (sub)class rebuilt by `func(*args)`.
                let [func, ty, inner, _state] = args.as_slice() else {
                    return Err("_rebuild_from_type_v2 called without its 4 arguments".into());
                };
                if !matches!(ty, Value::Global(Global::TensorType)) {
                    return Err(format!(
                        "_rebuild_from_type_v2 of {}, not torch.Tensor or Parameter",
                        describe(ty)
                    ));
                }
                if !matches!(
                    func,
                    Value::Global(Global::RebuildTensorV2 | Global::RebuildTensor)
                ) {
                    return Err(format!(
                        "_rebuild_from_type_v2 with {}, not _rebuild_tensor_v2",
                        describe(func)
                    ));
                }
                let inner = self.tuple_items(inner, "the arguments of _rebuild_from_type_v2")?;
                self.rebuild_tensor(&inner)
            }
            Global::TensorType
            | Global::StorageType(..)
            | Global::UntypedStorage
            | Global::DtypeObject(_) => Err(format!(
                "the pickle calls {}, which a state dict never does",
                describe(f)
            )),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])` (and the older `_rebuild_tensor` without the last ones).
    fn rebuild_tensor(&mut self, args: &[Value]) -> R<Value> {
        if args.len() < 4 {
            return Err(format!(
                "_rebuild_tensor called with {} arguments, fewer than (storage, offset, size, \
                 stride)",
                args.len()
            ));
        }
        let Value::Storage(storage) = args[0] else {
            return Err(format!(
                "a tensor rebuilt from {}, not a storage",
                describe(&args[0])
            ));
        };
        let offset = as_usize(&args[1], "a tensor's storage offset")?;
        let size = self.usize_tuple(&args[2], "a tensor's size")?;
        let stride = self.usize_tuple(&args[3], "a tensor's stride")?;
        if size.len() != stride.len() {
            return Err(format!(
                "a tensor with {} sizes and {} strides",
                size.len(),
                stride.len()
            ));
        }
        // Every element the view reaches must be in the storage.
        let s = &self.prog.storages[storage];
        let numel = size
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("a tensor of shape {size:?} overflows"))?;
        if numel > 0 {
            let last = size
                .iter()
                .zip(&stride)
                .try_fold(offset, |a, (&d, &st)| {
                    (d - 1).checked_mul(st).and_then(|x| a.checked_add(x))
                })
                .ok_or_else(|| format!("a tensor view (shape {size:?}) overflows"))?;
            if last >= s.numel {
                return Err(format!(
                    "a tensor of shape {size:?}, stride {stride:?} at offset {offset} reaches \
                     element {last} of storage {}, which holds {}",
                    s.key, s.numel
                ));
            }
            if numel > s.numel {
                return Err(format!(
                    "a tensor of shape {size:?} has more elements than its storage {} ({}): an \
                     expanded (overlapping) view; save a contiguous copy (.contiguous() or \
                     .clone())",
                    s.key, s.numel
                ));
            }
        }
        if self.prog.tensors.len() >= MAX_ITEMS {
            return Err(format!("the pickle builds more than {MAX_ITEMS} tensors"));
        }
        self.prog.tensors.push(TensorRef {
            storage,
            offset,
            size,
            stride,
        });
        Ok(Value::Tensor(self.prog.tensors.len() - 1))
    }

    fn usize_tuple(&self, v: &Value, what: &str) -> R<Vec<usize>> {
        let items = self.tuple_items(v, what)?;
        if items.len() > MAX_DIMS {
            return Err(format!("{what} has {} dimensions", items.len()));
        }
        items.iter().map(|x| as_usize(x, what)).collect()
    }
}

fn as_usize(v: &Value, what: &str) -> R<usize> {
    match v {
        Value::Int(n) => usize::try_from(*n).map_err(|_| format!("{what} is {n}")),
        other => Err(format!("{what} is {}, not an integer", describe(other))),
    }
}

/// A short description of a value for messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool => "a bool".into(),
        Value::Int(_) | Value::BigInt => "an int".into(),
        Value::Float => "a float".into(),
        Value::Str(s) => format!("the string {:?}", s.chars().take(40).collect::<String>()),
        Value::Bytes => "bytes".into(),
        Value::Obj(_) => "a container".into(),
        Value::Global(g) => format!("the global {g:?}"),
        Value::Tensor(_) => "a tensor".into(),
        Value::Storage(_) => "a storage".into(),
    }
}

/// The whitelisted globals; anything else is refused by name.
fn global(module: &str, name: &str) -> R<Global> {
    use Global::*;
    let storage = |d: Option<Dtype>, n: &'static str| Ok(StorageType(d, n));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(OrderedDict),
        ("torch._utils", "_rebuild_tensor") => Ok(RebuildTensor),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(RebuildParameterWithState),
        ("torch._tensor", "_rebuild_from_type_v2") => Ok(RebuildFromTypeV2),
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Ok(TensorType)
        }
        ("torch", "FloatStorage") => storage(Some(Dtype::F32), "FloatStorage"),
        ("torch", "DoubleStorage") => storage(Some(Dtype::F64), "DoubleStorage"),
        ("torch", "HalfStorage") => storage(Some(Dtype::F16), "HalfStorage"),
        ("torch", "BFloat16Storage") => storage(Some(Dtype::BF16), "BFloat16Storage"),
        ("torch", "LongStorage") => storage(Some(Dtype::I64), "LongStorage"),
        ("torch", "IntStorage") => storage(Some(Dtype::I32), "IntStorage"),
        ("torch", "ShortStorage") => storage(Some(Dtype::I16), "ShortStorage"),
        ("torch", "CharStorage") => storage(Some(Dtype::I8), "CharStorage"),
        ("torch", "ByteStorage") => storage(Some(Dtype::U8), "ByteStorage"),
        ("torch", "BoolStorage") => storage(Some(Dtype::BOOL), "BoolStorage"),
        ("torch", "ComplexFloatStorage") => storage(None, "ComplexFloatStorage"),
        ("torch", "ComplexDoubleStorage") => storage(None, "ComplexDoubleStorage"),
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => Ok(UntypedStorage),
        ("torch", d) => match dtype_object(d) {
            Some(d) => Ok(DtypeObject(d)),
            None => Err(refused(module, name)),
        },
        _ => Err(refused(module, name)),
    }
}

/// `torch.float32` and friends (`None`: a torch dtype safetensors lacks).
fn dtype_object(name: &str) -> Option<Option<Dtype>> {
    Some(match name {
        "float32" | "float" => Some(Dtype::F32),
        "float64" | "double" => Some(Dtype::F64),
        "float16" | "half" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::BF16),
        "int64" | "long" => Some(Dtype::I64),
        "int32" | "int" => Some(Dtype::I32),
        "int16" | "short" => Some(Dtype::I16),
        "int8" => Some(Dtype::I8),
        "uint8" => Some(Dtype::U8),
        "bool" => Some(Dtype::BOOL),
        "complex64" | "complex128" | "cfloat" | "cdouble" => None,
        _ => return None,
    })
}

fn refused(module: &str, name: &str) -> Refusal {
    let show = |s: &str| {
        s.chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    format!(
        "the pickle calls {}.{}, which a tensor state dict never needs; bnorm does not execute \
         it (save the model's state_dict(), not the model object or other Python objects)",
        show(module),
        show(name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_programs() {
        // {'a': 1, 'b': [2.5, None, True]} at protocol 2.
        let code = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b]q\x01(G@\x04\x00\x00\x00\x00\x00\x00N\x88eu.";
        let (v, prog) = run(code).unwrap();
        let Value::Obj(i) = v else { panic!() };
        let Obj::Dict(d) = &prog.objs[i] else {
            panic!()
        };
        assert_eq!(d.len(), 2);
        assert!(matches!(d[0].1, Value::Int(1)));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let e = run(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        let e = run(b"\x80\x02(((").unwrap_err();
        assert!(e.contains("STOP"), "{e}");
        assert!(run(b"\x80\x02h\x05.").unwrap_err().contains("memo"));
        assert!(run(b"\x80\x02.").unwrap_err().contains("empty stack"));
        let deep = [b"\x80\x02".as_slice(), &[b'('; 5000]].concat();
        assert!(run(&deep).unwrap_err().contains("MARK"));
        // LONG1 sign extension.
        let (v, _) = run(b"\x80\x02\x8a\x01\xff.").unwrap();
        assert!(matches!(v, Value::Int(-1)));
    }
}
