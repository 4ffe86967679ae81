//! Which shards a `path` names: webdataset's brace notation (`{00000..41407}` ranges keep their
//! zero padding, `{a,b}` alternatives), then for each expansion an http(s) URL as is, or the
//! local `.tar` files a file, folder or glob names.

use std::path::Path;

use crate::tables::files::expand;

/// Expansions above this are refused (a typo like `{0..99999999999}`).
const MAX_SHARDS: usize = 10_000_000;

/// One shard: a local file or a URL.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shard {
    /// A tar file on disk.
    File(std::path::PathBuf),
    /// A tar served over HTTP(S).
    Url(String),
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shard::File(p) => write!(f, "{}", p.display()),
            Shard::Url(u) => f.write_str(u),
        }
    }
}

/// True for an `http://` or `https://` address.
pub fn is_url(path: &str) -> bool {
    path.starts_with("http://") || path.starts_with("https://")
}

/// Expands webdataset's brace notation.
///
/// ```
/// use latentflow_operators::webdataset::shards::expand_braces;
/// assert_eq!(expand_braces("s/{008..010}.tar").unwrap(), ["s/008.tar", "s/009.tar", "s/010.tar"]);
/// assert_eq!(expand_braces("{a,b}-{1..2}").unwrap(), ["a-1", "a-2", "b-1", "b-2"]);
/// assert!(expand_braces("s/{1..}.tar").is_err());
/// ```
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("`{pattern}`: `}}` without `{{`"));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|c| open + c).ok_or_else(|| format!("`{pattern}`: `{{` without `}}`"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    if head.contains('}') {
        return Err(format!("`{pattern}`: `}}` without `{{`"));
    }
    let choices = brace_choices(body).map_err(|e| format!("`{pattern}`: {e}"))?;
    let rest = expand_braces(tail)?;
    if choices.len().saturating_mul(rest.len()) > MAX_SHARDS {
        return Err(format!("`{pattern}` names more than {MAX_SHARDS} shards"));
    }
    Ok(choices.iter().flat_map(|c| rest.iter().map(move |r| format!("{head}{c}{r}"))).collect())
}

fn brace_choices(body: &str) -> Result<Vec<String>, String> {
    if let Some((lo, hi)) = body.split_once("..") {
        let parse = |s: &str| s.parse::<u64>().map_err(|_| format!("`{{{body}}}`: `{s}` is not a number"));
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("`{{{body}}}`: the range runs backwards"));
        }
        if (b - a) as usize >= MAX_SHARDS {
            return Err(format!("`{{{body}}}` names more than {MAX_SHARDS} shards"));
        }
        // `{00000..41407}`: every number padded to the width of the first.
        let width = if lo.starts_with('0') && lo.len() > 1 { lo.len() } else { 0 };
        return Ok((a..=b).map(|n| format!("{n:0width$}")).collect());
    }
    let choices: Vec<String> = body.split(',').map(str::to_string).collect();
    if choices.len() < 2 {
        return Err(format!("`{{{body}}}` is neither a range `{{A..B}}` nor a list `{{a,b}}`"));
    }
    Ok(choices)
}

/// Every shard `path` names, in order: brace expansions in their order, local matches sorted.
/// Local patterns must each match a `.tar` file; URLs are not checked here.
pub fn list(path: &str) -> Result<Vec<Shard>, String> {
    if path.trim().is_empty() {
        return Err("no shards: set `path` to a .tar file, a folder, a glob or a URL".into());
    }
    let mut shards = Vec::new();
    for expanded in expand_braces(path)? {
        if is_url(&expanded) {
            shards.push(Shard::Url(expanded));
        } else if Path::new(&expanded).is_file() {
            shards.push(Shard::File(expanded.into()));
        } else {
            shards.extend(expand(&expanded, &["tar"])?.into_iter().map(Shard::File));
        }
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_errors() {
        assert_eq!(expand_braces("{0..2}").unwrap(), ["0", "1", "2"]);
        assert_eq!(expand_braces("x{9..11}y").unwrap(), ["x9y", "x10y", "x11y"]);
        assert_eq!(expand_braces("https://h/{00000..00002}.tar").unwrap().last().unwrap(), "https://h/00002.tar");
        for bad in ["{3..1}", "{a}", "{1..x}", "a}", "{1..2", "{0..99999999999}"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_files_folders_and_urls() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["00000.tar", "00001.tar", "00000.parquet"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let root = dir.path().display();
        assert_eq!(list(&root.to_string()).unwrap().len(), 2, "a folder: its .tar files");
        assert_eq!(list(&format!("{root}/{{00000..00001}}.tar")).unwrap().len(), 2);
        assert!(list(&format!("{root}/{{00000..00002}}.tar")).unwrap_err().contains("00002.tar does not exist"));
        assert_eq!(list("http://127.0.0.1:1/{0..1}.tar").unwrap()[1], Shard::Url("http://127.0.0.1:1/1.tar".into()));
        assert!(list(" ").is_err());
    }
}
