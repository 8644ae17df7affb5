//! A file whose every open blocks, as on a hung NFS or FUSE mount.

use std::path::Path;

/// A file whose every open blocks: `perl` holds a write lease on it (`F_SETLEASE`) and ignores
/// the `SIGIO` that asks it to give the lease back, so an open for reading waits for the
/// kernel's `lease-break-time` (45 s by default) — as an open on a hung NFS or FUSE mount
/// waits, but on a local file that `stat` still calls a regular one. Released when dropped.
pub struct Leased(std::process::Child);

impl Leased {
    pub fn hold(path: &Path) -> Leased {
        use std::io::BufRead;
        let mut child = std::process::Command::new("perl")
            .args([
                "-e",
                "use Fcntl; $SIG{IO} = 'IGNORE'; open(my $f, '<', $ARGV[0]) or die \"open: $!\"; \
                 fcntl($f, 1024, F_WRLCK) or die \"F_SETLEASE: $!\"; $| = 1; print \"leased\\n\"; \
                 sleep 600",
            ])
            .arg(path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("perl");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "leased\n", "no lease taken on {}", path.display());
        Leased(child)
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
