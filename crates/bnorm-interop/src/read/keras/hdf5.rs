//! A small read-only HDF5 parser for the part of the format that h5py writes with its
//! default settings (`libver="earliest"`), which is what Keras 3 and tf_keras produce:
//! superblock version 0 or 1, version-1 object headers (with continuation blocks),
//! symbol-table groups (version-1 B-tree + local heap), attributes (fixed-length and
//! variable-length strings through the global heap, numbers), and datasets stored
//! compact, contiguous or chunked without filters.
//!
//! Everything is bounds-checked against the bytes present: every address, length and
//! count is checked (overflow-checked arithmetic) before it is used, a dataset may not
//! claim more bytes than the file holds, group nesting and B-tree depth are bounded, and
//! a work budget proportional to the file's size bounds the total effort, so cyclic or
//! self-referencing structures end in an error, never in a loop. Errors are plain
//! strings; the caller wraps them in an [`InteropError`](crate::InteropError).

use std::collections::HashSet;

/// A failure: what is wrong, in words.
pub(super) type H5Result<T> = std::result::Result<T, String>;

/// The deepest B-tree this reader follows (HDF5 files written by h5py have a handful of
/// levels at most).
const MAX_BTREE_DEPTH: usize = 32;
/// The most continuation blocks one object header may have.
const MAX_HEADER_BLOCKS: usize = 256;
/// The most dimensions of a dataspace (HDF5's own limit).
const MAX_RANK: usize = 32;

/// "Undefined address" (all bits set).
const UNDEF: u64 = u64::MAX;

/// An open file.
pub(super) struct File<'a> {
    bytes: &'a [u8],
    base: u64,
    offset_size: usize,
    length_size: usize,
    root: u64,
    budget: std::cell::Cell<u64>,
    data_budget: std::cell::Cell<u64>,
}

/// An HDF5 datatype, as far as this reader needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataType {
    /// Integer of `size` bytes.
    Int {
        size: usize,
        signed: bool,
        little_endian: bool,
    },
    /// IEEE float of `size` bytes.
    Float { size: usize, little_endian: bool },
    /// Fixed-length string of `size` bytes.
    FixedString { size: usize },
    /// Variable-length string (an element is a length and a global-heap id).
    VarString,
    /// Anything else (HDF5 class number and element size).
    Other { class: u8, size: usize },
}

impl DataType {
    fn size(self, file: &File) -> usize {
        match self {
            DataType::Int { size, .. }
            | DataType::Float { size, .. }
            | DataType::FixedString { size }
            | DataType::Other { size, .. } => size,
            DataType::VarString => 4 + file.offset_size + 4,
        }
    }
}

/// A raw attribute: its type, shape and the bytes of its values.
struct Attribute<'a> {
    name: String,
    dtype: DataType,
    shape: Vec<u64>,
    data: &'a [u8],
}

/// Where a dataset's values are.
enum Layout<'a> {
    Compact(&'a [u8]),
    Contiguous { address: u64, size: u64 },
    Chunked { btree: u64, chunk: Vec<u64> },
}

/// One object (group or dataset) with the messages this reader uses.
pub(super) struct Object<'a> {
    /// The object's address (identity, for cycle checks).
    pub(super) address: u64,
    attributes: Vec<Attribute<'a>>,
    symbol_table: Option<(u64, u64)>,
    links: Vec<(String, u64)>,
    dense_links: bool,
    dtype: Option<DataType>,
    shape: Option<Vec<u64>>,
    layout: Option<Layout<'a>>,
    filtered: bool,
}

/// A dataset's values, as stored (little-endian after conversion).
pub(super) struct Data {
    pub(super) dtype: DataType,
    pub(super) shape: Vec<u64>,
    pub(super) bytes: Vec<u8>,
}

fn le(b: &[u8]) -> u64 {
    b.iter()
        .rev()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

impl<'a> File<'a> {
    /// Opens a file: checks the signature and reads the superblock.
    pub(super) fn open(bytes: &'a [u8]) -> H5Result<File<'a>> {
        if !bytes.starts_with(b"\x89HDF\r\n\x1a\n") {
            return Err("the HDF5 signature is missing".into());
        }
        let head = bytes
            .get(..24)
            .ok_or("the file ends inside the HDF5 superblock")?;
        let version = head[8];
        let (offset_size, length_size) = match version {
            0 | 1 => (head[13] as usize, head[14] as usize),
            2 | 3 => {
                return Err(format!(
                    "HDF5 superblock version {version} (a file written with h5py's \
                     libver=\"latest\" or by HDF5 1.10+ defaults); this reader knows the \
                     layout h5py writes by default (superblock 0/1): re-save the model with \
                     Keras, or copy it with h5py's default settings"
                ))
            }
            v => return Err(format!("unknown HDF5 superblock version {v}")),
        };
        for s in [offset_size, length_size] {
            if !matches!(s, 2 | 4 | 8) {
                return Err(format!("invalid HDF5 offset/length size {s}"));
            }
        }
        let budget = (bytes.len() as u64)
            .saturating_mul(64)
            .saturating_add(1 << 20);
        let mut f = File {
            bytes,
            base: 0,
            offset_size,
            length_size,
            root: 0,
            budget: std::cell::Cell::new(budget),
            // Every dataset and string is copied out at most a few times by a reader of
            // a real file; a hostile one that makes many names point at the same large
            // values runs out of this.
            data_budget: std::cell::Cell::new(
                (bytes.len() as u64)
                    .saturating_mul(4)
                    .saturating_add(16 << 20),
            ),
        };
        // Version 1 has 4 more bytes (indexed storage K + reserved) before the addresses.
        let mut pos = if version == 0 { 24 } else { 28 };
        f.base = f.addr_at(&mut pos)?;
        let _free_space = f.addr_at(&mut pos)?;
        let _eof = f.addr_at(&mut pos)?;
        let _driver = f.addr_at(&mut pos)?;
        // Root group symbol table entry: link name offset, object header address.
        let _name = f.addr_at(&mut pos)?;
        f.root = f.addr_at(&mut pos)?;
        Ok(f)
    }

    /// The root group's address.
    pub(super) fn root(&self) -> u64 {
        self.root
    }

    /// Spends `n` units of the work budget.
    fn spend(&self, n: u64) -> H5Result<()> {
        let left = self.budget.get();
        if n > left {
            return Err(
                "the file's structure is larger or more repetitive than its size justifies \
                 (a cycle or a hostile file)"
                    .into(),
            );
        }
        self.budget.set(left - n);
        Ok(())
    }

    /// Accounts for `n` bytes about to be copied out of the file.
    fn spend_data(&self, n: u64) -> H5Result<()> {
        let left = self.data_budget.get();
        if n > left {
            return Err(
                "the file's names refer to the same values over and over, more than its \
                 size justifies (a hostile file)"
                    .into(),
            );
        }
        self.data_budget.set(left - n);
        Ok(())
    }

    /// `len` bytes at absolute position `pos` of the file.
    fn slice(&self, pos: u64, len: u64) -> H5Result<&'a [u8]> {
        let end = pos.checked_add(len).ok_or("an address overflows")?;
        if end > self.bytes.len() as u64 {
            return Err(format!(
                "a structure at byte {pos} of length {len} lies past the end of the file \
                 ({} bytes): the file is truncated or corrupt",
                self.bytes.len()
            ));
        }
        Ok(&self.bytes[pos as usize..end as usize])
    }

    /// The file position of an HDF5 address.
    fn pos(&self, address: u64) -> H5Result<u64> {
        if address == UNDEF {
            return Err("an undefined address is used".into());
        }
        address
            .checked_add(self.base)
            .ok_or_else(|| "an address overflows".to_string())
    }

    fn uint_at(&self, pos: &mut u64, size: usize) -> H5Result<u64> {
        let b = self.slice(*pos, size as u64)?;
        *pos += size as u64;
        Ok(le(b))
    }

    fn addr_at(&self, pos: &mut u64) -> H5Result<u64> {
        let v = self.uint_at(pos, self.offset_size)?;
        Ok(
            if self.offset_size < 8 && v == (1u64 << (8 * self.offset_size)) - 1 {
                UNDEF
            } else {
                v
            },
        )
    }

    fn len_at(&self, pos: &mut u64) -> H5Result<u64> {
        self.uint_at(pos, self.length_size)
    }

    /// Reads the object header at `address`.
    pub(super) fn object(&self, address: u64) -> H5Result<Object<'a>> {
        self.spend(64)?;
        let start = self.pos(address)?;
        let head = self.slice(start, 16)?;
        if head.starts_with(b"OHDR") {
            return Err(
                "a version-2 HDF5 object header (written with libver=\"latest\"); this \
                 reader knows the version-1 headers h5py writes by default"
                    .into(),
            );
        }
        if head[0] != 1 {
            return Err(format!(
                "unknown object header version {} at address {address}",
                head[0]
            ));
        }
        let n_messages = u16::from_le_bytes([head[2], head[3]]) as usize;
        let size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64;
        let mut obj = Object {
            address,
            attributes: Vec::new(),
            symbol_table: None,
            links: Vec::new(),
            dense_links: false,
            dtype: None,
            shape: None,
            layout: None,
            filtered: false,
        };
        let mut blocks = vec![(start + 16, size)];
        let mut seen_blocks = HashSet::new();
        let mut read = 0usize;
        let mut i = 0;
        while i < blocks.len() && read < n_messages {
            if i >= MAX_HEADER_BLOCKS {
                return Err("an object header has too many continuation blocks".into());
            }
            let (block_pos, block_len) = blocks[i];
            i += 1;
            if !seen_blocks.insert(block_pos) {
                return Err("an object header's continuation blocks form a cycle".into());
            }
            let block = self.slice(block_pos, block_len)?;
            let mut p = 0usize;
            while p + 8 <= block.len() && read < n_messages {
                self.spend(8)?;
                let kind = u16::from_le_bytes([block[p], block[p + 1]]);
                let len = u16::from_le_bytes([block[p + 2], block[p + 3]]) as usize;
                let flags = block[p + 4];
                let body = block.get(p + 8..p + 8 + len).ok_or_else(|| {
                    format!("an object header message at address {address} overruns its block")
                })?;
                p += 8 + len;
                read += 1;
                if flags & 0x02 != 0 && matches!(kind, 0x0001 | 0x0003 | 0x000C) {
                    return Err(
                        "a shared (committed) HDF5 datatype or dataspace, which this reader \
                         does not follow"
                            .into(),
                    );
                }
                self.message(&mut obj, kind, body, &mut blocks)?;
            }
        }
        Ok(obj)
    }

    fn message(
        &self,
        obj: &mut Object<'a>,
        kind: u16,
        body: &'a [u8],
        blocks: &mut Vec<(u64, u64)>,
    ) -> H5Result<()> {
        let mut c = Cursor::new(self, body);
        match kind {
            0x0001 => obj.shape = Some(self.dataspace(body)?),
            0x0003 => obj.dtype = Some(datatype(body)?),
            0x0008 => obj.layout = Some(self.layout(body)?),
            0x000B => {
                // Filter pipeline: any filter means the chunks are encoded.
                let n = *body.get(1).ok_or("a filter pipeline message is empty")?;
                obj.filtered = n > 0;
            }
            0x000C => obj.attributes.push(self.attribute(body)?),
            0x0010 => {
                let addr = c.addr()?;
                let len = c.len()?;
                blocks.push((self.pos(addr)?, len));
            }
            0x0011 => {
                let btree = c.addr()?;
                let heap = c.addr()?;
                obj.symbol_table = Some((btree, heap));
            }
            0x0002 => {
                // Link info: a defined fractal-heap address means dense link storage.
                let _version = c.u8()?;
                let flags = c.u8()?;
                if flags & 1 != 0 {
                    c.skip(8)?;
                }
                let heap = c.addr()?;
                obj.dense_links = heap != UNDEF;
            }
            0x0006 => {
                if let Some(link) = self.link(body)? {
                    obj.links.push(link);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dataspace(&self, body: &[u8]) -> H5Result<Vec<u64>> {
        let mut c = Cursor::new(self, body);
        let version = c.u8()?;
        let rank = c.u8()? as usize;
        let _flags = c.u8()?;
        let null = match version {
            1 => {
                c.skip(5)?;
                false
            }
            2 => c.u8()? == 2,
            v => return Err(format!("unknown dataspace version {v}")),
        };
        if rank > MAX_RANK {
            return Err(format!(
                "a dataspace has {rank} dimensions (at most {MAX_RANK})"
            ));
        }
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(c.len()?);
        }
        if null {
            dims = vec![0];
        }
        Ok(dims)
    }

    fn layout(&self, body: &'a [u8]) -> H5Result<Layout<'a>> {
        let mut c = Cursor::new(self, body);
        let version = c.u8()?;
        if version != 3 {
            return Err(format!(
                "data layout message version {version}; this reader knows version 3 (what \
                 h5py writes by default)"
            ));
        }
        match c.u8()? {
            0 => {
                let n = u16::from_le_bytes([c.u8()?, c.u8()?]) as usize;
                Ok(Layout::Compact(c.take(n)?))
            }
            1 => Ok(Layout::Contiguous {
                address: c.addr()?,
                size: c.len()?,
            }),
            2 => {
                let n = c.u8()? as usize;
                if n == 0 || n > MAX_RANK + 1 {
                    return Err(format!("a chunked layout has {n} dimensions"));
                }
                let btree = c.addr()?;
                let mut chunk = Vec::with_capacity(n);
                for _ in 0..n {
                    chunk.push(u64::from(c.u32()?));
                }
                Ok(Layout::Chunked { btree, chunk })
            }
            k => Err(format!("unknown data layout class {k}")),
        }
    }

    fn attribute(&self, body: &'a [u8]) -> H5Result<Attribute<'a>> {
        let mut c = Cursor::new(self, body);
        let version = c.u8()?;
        let flags = c.u8()?;
        let name_len = c.u16()? as usize;
        let dt_len = c.u16()? as usize;
        let ds_len = c.u16()? as usize;
        let pad = |n: usize| if version == 1 { n.div_ceil(8) * 8 } else { n };
        match version {
            1 => {}
            2 | 3 => {
                if flags & 3 != 0 {
                    return Err("an attribute with a shared datatype or dataspace".into());
                }
                if version == 3 {
                    c.skip(1)?;
                }
            }
            v => return Err(format!("unknown attribute message version {v}")),
        }
        let name = c.take(pad(name_len))?;
        let name = name.get(..name_len).ok_or("bad attribute name")?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).into_owned();
        let dt = c.take(pad(dt_len))?;
        let dtype = datatype(dt)?;
        let ds = c.take(pad(ds_len))?;
        let shape = self.dataspace(ds)?;
        let n = numel(&shape)?;
        let size = n
            .checked_mul(dtype.size(self) as u64)
            .ok_or("an attribute's size overflows")?;
        let data = c
            .take(usize::try_from(size).map_err(|_| "attribute too large")?)
            .map_err(|_| format!("attribute {name:?} claims more data than it holds"))?;
        Ok(Attribute {
            name,
            dtype,
            shape,
            data,
        })
    }

    /// A link message: (name, object address) for a hard link; soft and external links
    /// are skipped (they point outside what this reader follows).
    fn link(&self, body: &[u8]) -> H5Result<Option<(String, u64)>> {
        let mut c = Cursor::new(self, body);
        let version = c.u8()?;
        if version != 1 {
            return Err(format!("unknown link message version {version}"));
        }
        let flags = c.u8()?;
        let kind = if flags & 0x08 != 0 { c.u8()? } else { 0 };
        if flags & 0x04 != 0 {
            c.skip(8)?;
        }
        if flags & 0x10 != 0 {
            c.skip(1)?;
        }
        let len_size = 1usize << (flags & 3);
        let name_len = le(c.take(len_size)?) as usize;
        let name = String::from_utf8_lossy(c.take(name_len)?).into_owned();
        if kind != 0 {
            return Ok(None);
        }
        Ok(Some((name, c.addr()?)))
    }

    /// The members of a group: (name, object address), in the file's order.
    pub(super) fn members(&self, obj: &Object<'a>) -> H5Result<Vec<(String, u64)>> {
        if obj.dense_links {
            return Err(
                "a group with dense link storage (a fractal heap, written with \
                 libver=\"latest\" for large groups); this reader does not read it"
                    .into(),
            );
        }
        let mut out = obj.links.clone();
        if let Some((btree, heap)) = obj.symbol_table {
            let heap = self.local_heap(heap)?;
            let mut visited = HashSet::new();
            self.group_btree(btree, heap, 0, &mut visited, &mut out)?;
        }
        Ok(out)
    }

    /// The data segment of a local heap.
    fn local_heap(&self, address: u64) -> H5Result<&'a [u8]> {
        let mut pos = self.pos(address)?;
        if self.slice(pos, 4)? != b"HEAP" {
            return Err("a group's local heap has no HEAP signature".into());
        }
        pos += 8;
        let size = self.len_at(&mut pos)?;
        let _free = self.len_at(&mut pos)?;
        let data = self.addr_at(&mut pos)?;
        self.slice(self.pos(data)?, size)
    }

    fn group_btree(
        &self,
        address: u64,
        heap: &'a [u8],
        depth: usize,
        visited: &mut HashSet<u64>,
        out: &mut Vec<(String, u64)>,
    ) -> H5Result<()> {
        if depth > MAX_BTREE_DEPTH {
            return Err("a group's B-tree is too deep (a cycle or a hostile file)".into());
        }
        if !visited.insert(address) {
            return Err("a group's B-tree refers to a node twice".into());
        }
        self.spend(64)?;
        let mut pos = self.pos(address)?;
        let head = self.slice(pos, 8)?;
        if &head[..4] != b"TREE" || head[4] != 0 {
            return Err("a group's B-tree node is not a group node (TREE type 0)".into());
        }
        let level = head[5];
        let entries = u16::from_le_bytes([head[6], head[7]]) as u64;
        pos += 8 + 2 * self.offset_size as u64;
        let mut children = Vec::new();
        for _ in 0..entries {
            self.spend(8)?;
            let _key = self.len_at(&mut pos)?;
            children.push(self.addr_at(&mut pos)?);
        }
        for child in children {
            if level > 0 {
                self.group_btree(child, heap, depth + 1, visited, out)?;
            } else {
                self.symbol_node(child, heap, out)?;
            }
        }
        Ok(())
    }

    fn symbol_node(
        &self,
        address: u64,
        heap: &'a [u8],
        out: &mut Vec<(String, u64)>,
    ) -> H5Result<()> {
        let mut pos = self.pos(address)?;
        let head = self.slice(pos, 8)?;
        if &head[..4] != b"SNOD" {
            return Err("a group's symbol node has no SNOD signature".into());
        }
        let n = u16::from_le_bytes([head[6], head[7]]);
        pos += 8;
        for _ in 0..n {
            self.spend(16)?;
            let name_off = self.addr_at(&mut pos)?;
            let obj = self.addr_at(&mut pos)?;
            pos += 24;
            let name = usize::try_from(name_off)
                .ok()
                .and_then(|o| heap.get(o..))
                .ok_or("a group member's name lies outside the local heap")?;
            let end = name
                .iter()
                .position(|&b| b == 0)
                .ok_or("a group member's name is not terminated")?;
            out.push((String::from_utf8_lossy(&name[..end]).into_owned(), obj));
        }
        Ok(())
    }

    /// The object at `path` (`/`-separated names) below `obj`.
    pub(super) fn find(&self, obj: &Object<'a>, path: &str) -> H5Result<Option<Object<'a>>> {
        let mut cur: Option<Object<'a>> = None;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let here = cur.as_ref().unwrap_or(obj);
            let members = self.members(here)?;
            match members.iter().find(|(n, _)| n == part) {
                Some((_, addr)) => cur = Some(self.object(*addr)?),
                None => return Ok(None),
            }
        }
        match cur {
            Some(o) => Ok(Some(o)),
            None => Ok(Some(self.object(obj.address)?)),
        }
    }

    /// The string values of attribute `name` (`None` when there is none). Numbers are
    /// refused; a scalar gives one string.
    pub(super) fn attr_strings(
        &self,
        obj: &Object<'a>,
        name: &str,
    ) -> H5Result<Option<Vec<String>>> {
        let Some(a) = obj.attributes.iter().find(|a| a.name == name) else {
            return Ok(None);
        };
        let size = a.dtype.size(self);
        let n = numel(&a.shape)? as usize;
        let mut out = Vec::with_capacity(n.min(a.data.len()));
        for i in 0..n {
            self.spend(4)?;
            let el = &a.data[i * size..(i + 1) * size];
            let bytes = match a.dtype {
                DataType::FixedString { .. } => {
                    let end = el.iter().position(|&b| b == 0).unwrap_or(el.len());
                    &el[..end]
                }
                DataType::VarString => {
                    let len = le(&el[..4]);
                    let heap = le(&el[4..4 + self.offset_size]);
                    let index = le(&el[4 + self.offset_size..]);
                    let obj = self.global_heap_object(heap, index)?;
                    obj.get(..usize::try_from(len).unwrap_or(usize::MAX))
                        .ok_or("a string is longer than its global heap object")?
                }
                other => return Err(format!("attribute {name:?} holds {other:?}, not strings")),
            };
            self.spend_data(bytes.len() as u64)?;
            out.push(String::from_utf8_lossy(bytes).into_owned());
        }
        Ok(Some(out))
    }

    fn global_heap_object(&self, address: u64, index: u64) -> H5Result<&'a [u8]> {
        let start = self.pos(address)?;
        let head = self.slice(start, 8)?;
        if &head[..4] != b"GCOL" {
            return Err("a global heap collection has no GCOL signature".into());
        }
        let mut pos = start + 8;
        let size = self.len_at(&mut pos)?;
        let end = start.checked_add(size).ok_or("a global heap overflows")?;
        self.slice(start, size)?;
        while pos + 8 + self.length_size as u64 <= end {
            self.spend(4)?;
            let idx = self.uint_at(&mut pos, 2)?;
            pos += 6;
            let len = self.len_at(&mut pos)?;
            if idx == 0 {
                break;
            }
            let data = self.slice(pos, len)?;
            if idx == index {
                return Ok(data);
            }
            let padded = len
                .div_ceil(8)
                .checked_mul(8)
                .ok_or("a heap object overflows")?;
            pos = pos.checked_add(padded).ok_or("a heap object overflows")?;
        }
        Err(format!("global heap object {index} is missing"))
    }

    /// Whether `obj` is a dataset (has a layout).
    pub(super) fn is_dataset(obj: &Object<'a>) -> bool {
        obj.layout.is_some()
    }

    /// Reads a dataset's values.
    pub(super) fn read(&self, obj: &Object<'a>) -> H5Result<Data> {
        let (Some(dtype), Some(shape), Some(layout)) = (obj.dtype, &obj.shape, &obj.layout) else {
            return Err("a dataset lacks its datatype, dataspace or layout".into());
        };
        let esize = dtype.size(self) as u64;
        let n = numel(shape)?;
        let total = n.checked_mul(esize).ok_or("a dataset's size overflows")?;
        if total > self.bytes.len() as u64 {
            return Err(format!(
                "a dataset claims {total} bytes, more than the whole file ({} bytes)",
                self.bytes.len()
            ));
        }
        self.spend_data(total)?;
        let mut bytes = match layout {
            Layout::Compact(data) => data
                .get(..total as usize)
                .ok_or("a compact dataset holds fewer bytes than its shape needs")?
                .to_vec(),
            Layout::Contiguous { address, size } => {
                if *address == UNDEF {
                    if total == 0 {
                        Vec::new()
                    } else {
                        return Err("a dataset has no data written".into());
                    }
                } else {
                    if *size < total {
                        return Err("a contiguous dataset is smaller than its shape needs".into());
                    }
                    self.slice(self.pos(*address)?, total)?.to_vec()
                }
            }
            Layout::Chunked { btree, chunk } => {
                if obj.filtered {
                    return Err(
                        "a dataset is compressed or filtered (HDF5 filters), which this reader \
                         does not decode: re-save it without compression"
                            .into(),
                    );
                }
                self.read_chunked(*btree, chunk, shape, esize, total)?
            }
        };
        match dtype {
            DataType::Int {
                little_endian: false,
                size,
                ..
            }
            | DataType::Float {
                little_endian: false,
                size,
            } if size > 1 => bytes.chunks_exact_mut(size).for_each(|c| c.reverse()),
            _ => {}
        }
        Ok(Data {
            dtype,
            shape: shape.clone(),
            bytes,
        })
    }

    fn read_chunked(
        &self,
        btree: u64,
        chunk: &[u64],
        shape: &[u64],
        esize: u64,
        total: u64,
    ) -> H5Result<Vec<u8>> {
        let rank = shape.len();
        if chunk.len() != rank + 1 || chunk[rank] != esize || chunk[..rank].contains(&0) {
            return Err("a chunked dataset's chunk shape does not match its dataspace".into());
        }
        let mut out = vec![0u8; total as usize];
        if btree == UNDEF || total == 0 {
            return Ok(out);
        }
        let chunk_bytes = chunk
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or("a chunk's size overflows")?;
        let mut visited = HashSet::new();
        let mut stack = vec![(btree, 0usize)];
        while let Some((address, depth)) = stack.pop() {
            if depth > MAX_BTREE_DEPTH || !visited.insert(address) {
                return Err("a dataset's chunk B-tree is too deep or has a cycle".into());
            }
            self.spend(64)?;
            let mut pos = self.pos(address)?;
            let head = self.slice(pos, 8)?;
            if &head[..4] != b"TREE" || head[4] != 1 {
                return Err("a dataset's chunk B-tree node is not a chunk node".into());
            }
            let level = head[5];
            let entries = u16::from_le_bytes([head[6], head[7]]);
            pos += 8 + 2 * self.offset_size as u64;
            for _ in 0..entries {
                let size = self.uint_at(&mut pos, 4)?;
                let _mask = self.uint_at(&mut pos, 4)?;
                let mut offsets = Vec::with_capacity(rank + 1);
                for _ in 0..=rank {
                    offsets.push(self.uint_at(&mut pos, 8)?);
                }
                let child = self.addr_at(&mut pos)?;
                if level > 0 {
                    stack.push((child, depth + 1));
                    continue;
                }
                if size != chunk_bytes {
                    return Err("a chunk's stored size differs from its shape".into());
                }
                self.spend(chunk_bytes / 8 + 1)?;
                let data = self.slice(self.pos(child)?, chunk_bytes)?;
                copy_chunk(
                    &mut out,
                    data,
                    &offsets[..rank],
                    &chunk[..rank],
                    shape,
                    esize,
                )?;
            }
        }
        Ok(out)
    }
}

/// Copies one chunk (at `offsets`, of `cdims`) into the row-major output of `shape`.
fn copy_chunk(
    out: &mut [u8],
    data: &[u8],
    offsets: &[u64],
    cdims: &[u64],
    shape: &[u64],
    esize: u64,
) -> H5Result<()> {
    let rank = shape.len();
    if rank == 0 {
        let n = out.len().min(data.len());
        out[..n].copy_from_slice(&data[..n]);
        return Ok(());
    }
    for d in 0..rank {
        if offsets[d] >= shape[d] || !offsets[d].is_multiple_of(cdims[d]) {
            return Err("a chunk lies outside its dataset".into());
        }
    }
    let last = rank - 1;
    let run = cdims[last].min(shape[last] - offsets[last]);
    let mut idx = vec![0u64; rank];
    loop {
        // Row start in the chunk and in the output.
        let mut cpos = 0u64;
        let mut opos = 0u64;
        let mut inside = true;
        for d in 0..rank {
            cpos = cpos * cdims[d] + idx[d];
            let g = offsets[d] + idx[d];
            if g >= shape[d] {
                inside = false;
            }
            opos = opos * shape[d] + g.min(shape[d].saturating_sub(1));
        }
        if inside {
            let (c0, o0, len) = (cpos * esize, opos * esize, run * esize);
            let src = data
                .get(c0 as usize..(c0 + len) as usize)
                .ok_or("a chunk is shorter than its shape")?;
            out.get_mut(o0 as usize..(o0 + len) as usize)
                .ok_or("a chunk lies outside its dataset")?
                .copy_from_slice(src);
        }
        // Next row: increment all but the last index.
        let mut d = last;
        loop {
            if d == 0 {
                return Ok(());
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < cdims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The number of elements of a shape (a scalar has one), overflow-checked.
fn numel(shape: &[u64]) -> H5Result<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("a shape's element count overflows: {shape:?}"))
}

fn datatype(body: &[u8]) -> H5Result<DataType> {
    let head = body.get(..8).ok_or("a datatype message is truncated")?;
    let class = head[0] & 0x0f;
    let bits = head[1];
    let size = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if size == 0 {
        return Err("a datatype has size 0".into());
    }
    Ok(match class {
        0 => DataType::Int {
            size,
            signed: bits & 0x08 != 0,
            little_endian: bits & 0x01 == 0,
        },
        1 => {
            if bits & 0x40 != 0 {
                return Err("a VAX-ordered float".into());
            }
            DataType::Float {
                size,
                little_endian: bits & 0x01 == 0,
            }
        }
        3 => DataType::FixedString { size },
        9 if bits & 0x0f == 1 => DataType::VarString,
        _ => DataType::Other { class, size },
    })
}

/// Reads fields of a message body.
struct Cursor<'f, 'a> {
    file: &'f File<'a>,
    body: &'a [u8],
    pos: usize,
}

impl<'f, 'a> Cursor<'f, 'a> {
    fn new(file: &'f File<'a>, body: &'a [u8]) -> Self {
        Cursor { file, body, pos: 0 }
    }
    fn take(&mut self, n: usize) -> H5Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or("a message field overflows")?;
        let s = self
            .body
            .get(self.pos..end)
            .ok_or("a header message is shorter than its fields")?;
        self.pos = end;
        Ok(s)
    }
    fn skip(&mut self, n: usize) -> H5Result<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> H5Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> H5Result<u16> {
        Ok(le(self.take(2)?) as u16)
    }
    fn u32(&mut self) -> H5Result<u32> {
        Ok(le(self.take(4)?) as u32)
    }
    fn addr(&mut self) -> H5Result<u64> {
        let s = self.file.offset_size;
        let v = le(self.take(s)?);
        Ok(if s < 8 && v == (1u64 << (8 * s)) - 1 {
            UNDEF
        } else {
            v
        })
    }
    fn len(&mut self) -> H5Result<u64> {
        let s = self.file.length_size;
        Ok(le(self.take(s)?))
    }
}
