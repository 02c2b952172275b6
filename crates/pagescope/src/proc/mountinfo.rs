//! Pure parser for `/proc/PID/mountinfo`: which devices are tmpfs (shmem)
//! or hugetlbfs, so a file mapping's `dev` in maps tells its backing.
//!
//! # References
//! - `proc_pid_mountinfo(5)`

use super::maps::DevId;
use super::swaps::unescape_octal;

/// One mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Device of the superblock.
    pub dev: DevId,
    /// Mount point (unescaped).
    pub mount_point: Vec<u8>,
    /// Filesystem type (`tmpfs`, `hugetlbfs`, `ext4`, ...).
    pub fstype: String,
}

/// Parses `/proc/PID/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(buf: &[u8]) -> Vec<Mount> {
    buf.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<Mount> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let dev = DevId::parse(fields.get(2)?, 10)?;
    let mount_point = unescape_octal(fields.get(4)?);
    let sep = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = String::from_utf8_lossy(fields.get(sep + 1)?).into_owned();
    Some(Mount {
        dev,
        mount_point,
        fstype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_mountinfo() {
        let m = parse_mountinfo(
            b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
25 22 0:22 / /dev/shm rw,nosuid,nodev shared:3 - tmpfs tmpfs rw\n\
26 22 0:23 / /mnt/my\\040huge rw master:1 - hugetlbfs none rw,pagesize=2M\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].fstype, "tmpfs");
        assert_eq!(
            m[1].dev,
            DevId {
                major: 0,
                minor: 22
            }
        );
        assert_eq!(m[2].mount_point, b"/mnt/my huge");
        assert_eq!(m[2].fstype, "hugetlbfs");
    }
}
