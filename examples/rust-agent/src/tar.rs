//! A POSIX tar (pax) writer: ustar headers, with a pax extended header for whatever
//! ustar cannot hold (names or link targets over 100 bytes or not ASCII, sizes of
//! 8 GiB and more, large ids, times before 1970). GNU tar, bsdtar and Python's tarfile
//! read it back byte for byte, non-UTF-8 names included (`hdrcharset=BINARY`).

use std::io::{self, Write};

const BLOCK: usize = 512;
/// The archive ends on a whole record of 20 blocks, as tar(1) writes it.
const RECORD: u64 = 20 * BLOCK as u64;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    Symlink,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::Symlink => b'2',
            Kind::Directory => b'5',
        }
    }
}

/// What a header says about one member.
pub struct Member<'a> {
    pub name: &'a [u8],
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub link: &'a [u8],
}

pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
    /// Bytes of the current member's data still expected.
    remaining: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter { out, written: 0, remaining: 0 }
    }

    #[cfg(test)]
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// The header(s) of one member; for a file, exactly `size` bytes of `data` follow.
    pub fn header(&mut self, member: &Member<'_>) -> io::Result<()> {
        assert_eq!(self.remaining, 0, "the previous member's data is incomplete");
        let mut name = member.name.to_vec();
        if member.kind == Kind::Directory && name.last() != Some(&b'/') {
            name.push(b'/');
        }
        let size = if member.kind == Kind::File { member.size } else { 0 };
        let mut pax = Vec::new();
        let (plain_name, plain_link) = (plain(&name), plain(member.link));
        let binary =
            std::str::from_utf8(&name).is_err() || std::str::from_utf8(member.link).is_err();
        if binary && !(plain_name && plain_link) {
            record(&mut pax, "hdrcharset", b"BINARY");
        }
        if !plain_name {
            record(&mut pax, "path", &name);
        }
        if !plain_link {
            record(&mut pax, "linkpath", member.link);
        }
        if !fits(size, 12) {
            record(&mut pax, "size", size.to_string().as_bytes());
        }
        if !fits(member.uid, 8) {
            record(&mut pax, "uid", member.uid.to_string().as_bytes());
        }
        if !fits(member.gid, 8) {
            record(&mut pax, "gid", member.gid.to_string().as_bytes());
        }
        if member.mtime < 0 || !fits(member.mtime as u64, 12) {
            record(&mut pax, "mtime", member.mtime.to_string().as_bytes());
        }
        if !pax.is_empty() {
            let mut pax_name = b"PaxHeader/".to_vec();
            pax_name.extend(name.iter().filter(|b| b.is_ascii_graphic()).take(80));
            let block = ustar(&pax_name, b'x', pax.len() as u64, 0o644, 0, 0, 0, b"");
            self.put(&block)?;
            self.put(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let mtime = if member.mtime < 0 { 0 } else { member.mtime as u64 };
        let block = ustar(
            &name,
            member.kind.flag(),
            size,
            member.mode,
            member.uid,
            member.gid,
            mtime,
            member.link,
        );
        self.put(&block)?;
        self.remaining = size;
        Ok(())
    }

    /// Part of the current file's data (never more than its header announced).
    pub fn data(&mut self, chunk: &[u8]) -> io::Result<()> {
        assert!(chunk.len() as u64 <= self.remaining, "more data than the header announced");
        self.remaining -= chunk.len() as u64;
        self.put(chunk)?;
        if self.remaining == 0 {
            self.pad(self.written)?;
        }
        Ok(())
    }

    /// Bytes of data still owed to the current member (zeros fill a file that shrank).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    fn pad(&mut self, length: u64) -> io::Result<()> {
        let tail = (length % BLOCK as u64) as usize;
        if tail != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - tail])?;
        }
        Ok(())
    }

    /// The end-of-archive blocks, then the writer back (to flush and sync it).
    pub fn finish(mut self) -> io::Result<W> {
        assert_eq!(self.remaining, 0, "the last member's data is incomplete");
        self.put(&[0u8; 2 * BLOCK])?;
        let tail = self.written % RECORD;
        if tail != 0 {
            let zeros = vec![0u8; (RECORD - tail) as usize];
            self.put(&zeros)?;
        }
        Ok(self.out)
    }
}

/// Whether ustar's 100-byte field holds `text` as it is.
fn plain(text: &[u8]) -> bool {
    text.len() <= 100 && text.is_ascii()
}

/// Whether `value` fits an octal field of `width` bytes (digits plus a NUL).
fn fits(value: u64, width: u32) -> bool {
    value < 8u64.pow(width - 1)
}

/// One pax record: "LEN KEY=VALUE\n", LEN counting its own digits.
fn record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut digits = 1;
    while (base + digits).to_string().len() > digits {
        digits += 1;
    }
    out.extend_from_slice(format!("{} {}=", base + digits, key).as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let value = value.min(8u64.pow(width as u32) - 1); // the pax header carries the real one
    let text = format!("{:0width$o}", value, width = width);
    field[..width].copy_from_slice(text.as_bytes());
    field[width] = 0;
}

#[allow(clippy::too_many_arguments)]
fn ustar(
    name: &[u8],
    flag: u8,
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: &[u8],
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(mode & 0o7777));
    octal(&mut h[108..116], uid);
    octal(&mut h[116..124], gid);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = flag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{:06o}\0 ", sum);
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pax_record_counts_its_own_length() {
        let mut out = Vec::new();
        record(&mut out, "path", &[b'a'; 95]);
        assert_eq!(out.len(), 105);
        assert!(out.starts_with(b"105 path="));
        let mut short = Vec::new();
        record(&mut short, "size", b"1");
        assert_eq!(short, b"9 size=1\n");
    }

    fn member<'a>(name: &'a [u8], size: u64, mtime: i64, link: &'a [u8]) -> Member<'a> {
        let kind = if link.is_empty() { Kind::File } else { Kind::Symlink };
        Member { name, kind, size, mode: 0o644, uid: 0, gid: 0, mtime, link }
    }

    fn headers(m: &Member<'_>) -> Vec<u8> {
        let mut tar = TarWriter::new(Vec::new());
        tar.header(m).unwrap();
        tar.remaining = 0; // the data itself is not the point here
        tar.out
    }

    #[test]
    fn ustar_alone_when_it_holds_everything() {
        let out = headers(&member(b"plain.txt", 5, 1_000_000_000, b""));
        assert_eq!(out.len(), BLOCK);
        assert_eq!(&out[..9], b"plain.txt");
        assert_eq!(out[156], b'0');
        assert_eq!(&out[124..136], b"00000000005\0");
    }

    #[test]
    fn pax_for_what_ustar_cannot_hold() {
        let long = [b'n'; 150];
        let out = headers(&member(&long, 9 << 30, -5, b""));
        assert_eq!(out[156], b'x');
        let pax = String::from_utf8_lossy(&out[BLOCK..2 * BLOCK]).into_owned();
        assert!(pax.contains(&format!("path={}\n", "n".repeat(150))));
        assert!(pax.contains(&format!("size={}\n", 9u64 << 30)));
        assert!(pax.contains("mtime=-5\n"));
        assert!(!pax.contains("hdrcharset"));
        assert_eq!(out.len(), 3 * BLOCK);
    }

    #[test]
    fn binary_names_and_long_links_are_flagged() {
        let out = headers(&member(b"caf\xe9", 0, 0, &[b'l'; 120]));
        let pax = String::from_utf8_lossy(&out[BLOCK..2 * BLOCK]).into_owned();
        assert!(pax.starts_with("21 hdrcharset=BINARY\n"));
        assert!(pax.contains("path=caf"));
        assert!(pax.contains(&format!("linkpath={}\n", "l".repeat(120))));
        assert_eq!(out[2 * BLOCK + 156], b'2');
    }

    #[test]
    fn the_checksum_is_the_sum_of_the_header() {
        let out = headers(&member(b"x", 1, 0, b""));
        let mut copy = out.clone();
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(&out[148..156], format!("{:06o}\0 ", sum).as_bytes());
    }

    #[test]
    fn data_is_padded_to_blocks_and_the_archive_to_records() {
        let mut tar = TarWriter::new(Vec::new());
        let member = Member {
            name: b"a",
            kind: Kind::File,
            size: 3,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            link: b"",
        };
        tar.header(&member).unwrap();
        tar.data(b"abc").unwrap();
        assert_eq!(tar.bytes_written(), 1024);
        let out = tar.finish().unwrap();
        assert_eq!(out.len() as u64, RECORD);
    }
}
