//! Replacing a file so that readers (and a crash) see either the old content or the new
//! one, never a mix: write a temporary file next to it, sync it, rename it over.

use std::io::Write;
use std::path::Path;

pub fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
