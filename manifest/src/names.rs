//! The shapes of names and other identifiers. Each check returns why the
//! text is wrong, phrased to follow "must be ...".

pub(crate) const DNS_LABEL: &str = "a DNS label: 1 to 63 lowercase letters, digits or '-', \
     starting with a letter and not ending with '-'";

/// App, project and port names; they appear in host names and container
/// names, so they are DNS labels (RFC 1123), starting with a letter.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("must be {DNS_LABEL}, got {s:?}"))
    }
}

/// A route's host: a lowercase DNS name, or `*.` followed by one with at
/// least two labels (`*.example.com`, never `*.com`).
pub(crate) fn hostname(s: &str) -> Result<(), String> {
    let rule = "must be a lowercase DNS name (like www.example.com, or *.example.com for a \
                wildcard)";
    let (name, wildcard) = match s.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    if s.len() > 253 {
        return Err(format!(
            "{rule}, at most 253 characters; got {} characters",
            s.len()
        ));
    }
    if name.is_empty() {
        return Err(format!("{rule}, got {s:?}"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        if label.contains('*') {
            return Err(format!(
                "{rule}; '*' is only allowed as the whole first label, got {s:?}"
            ));
        }
        if label.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("{rule}; write it in lowercase, got {s:?}"));
        }
        let ok = (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "{rule}: each dot-separated label 1 to 63 letters, digits or '-', \
                 not starting or ending with '-'; got {s:?}"
            ));
        }
    }
    if wildcard && labels.len() < 2 {
        return Err(format!(
            "a wildcard must cover a domain of at least two labels (*.example.com), got {s:?}"
        ));
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a shell can export.
pub(crate) fn env_name(s: &str) -> Result<(), String> {
    let ok = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "environment variable names must match [A-Za-z_][A-Za-z0-9_]*, got {s:?}"
        ))
    }
}

/// A node label key: letters, digits, `.`, `_`, `-`, `/`, starting and ending
/// with a letter or digit (`disk`, `example.com/gpu`), at most 253.
pub(crate) fn label_key(s: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = (1..=253).contains(&s.len())
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be a label key: 1 to 253 letters, digits, '.', '_', '-' or '/', starting and \
             ending with a letter or digit; got {s:?}"
        ))
    }
}

/// A region, zone or role name as nodes register them: 1 to 63 letters,
/// digits, `.`, `_` or `-`, starting and ending with a letter or digit.
pub(crate) fn topology_name(s: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = (1..=63).contains(&s.len())
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to 63 letters, digits, '.', '_' or '-', starting and ending with a letter \
             or digit; got {s:?}"
        ))
    }
}

/// An image reference. Its full grammar is the engine's business; here only
/// what is never right.
pub(crate) fn image(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(
            "must be an image reference like registry.example.com/team/web:1.4, got \
                    an empty string"
                .to_owned(),
        );
    }
    if s.len() > 1024 {
        return Err(format!("must be at most 1024 characters, got {}", s.len()));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "an image reference cannot contain whitespace or control characters, got {s:?}"
        ));
    }
    Ok(())
}

/// A route's path prefix. Prefixes match whole segments (`/api` matches
/// `/api` and `/api/x`, not `/apix`), so a trailing '/' would only confuse.
pub(crate) fn path_prefix(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("must start with '/', got {s:?}"));
    }
    if s.len() > 1024 {
        return Err(format!("must be at most 1024 characters, got {}", s.len()));
    }
    if let Some(c) = s.chars().find(|&c| !is_path_char(c)) {
        return Err(format!(
            "must be a URL path: {c:?} is not allowed (percent-encode it; no query or \
             fragment), got {s:?}"
        ));
    }
    if s != "/" && s.ends_with('/') {
        return Err(format!(
            "must not end with '/' (prefixes match whole segments: /api matches /api/x), got \
             {s:?}"
        ));
    }
    if s.contains("//") {
        return Err(format!(
            "must not contain an empty segment ('//'), got {s:?}"
        ));
    }
    if s.split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(format!("must not contain '.' or '..' segments, got {s:?}"));
    }
    Ok(())
}

/// RFC 3986 `pchar` and `/`.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@%/".contains(c)
}

/// A health check's request target: a path, optionally with a query.
pub(crate) fn http_check_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("must start with '/', got {s:?}"));
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(format!(
            "must be a URL path (and query) without whitespace or '#', got {s:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web", "web-2", "a1", &"a".repeat(63)] {
            assert_eq!(dns_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "2web",
            "-web",
            "web-",
            "we_b",
            "wéb",
            "web.app",
            &"a".repeat(64),
        ] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames() {
        for ok in [
            "example.com",
            "www.example.com",
            "*.example.com",
            "a-1.b2.c",
            "localhost",
        ] {
            assert_eq!(hostname(ok), Ok(()), "{ok}");
        }
        let long = format!("{}.com", "a".repeat(64));
        for bad in [
            "",
            "*",
            "*.com",
            "Example.com",
            "a..b",
            ".a",
            "a.",
            "-a.com",
            "a-.com",
            "a.*.com",
            "w*.example.com",
            "a_b.com",
            "a b.com",
            &long,
        ] {
            assert!(hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_A", "FOO_BAR", "foo1"] {
            assert_eq!(env_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1A", "FOO-BAR", "FOO BAR", "FÖÖ", "A=B"] {
            assert!(env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_prefixes() {
        for ok in ["/", "/api", "/api/v1", "/a%20b", "/~user"] {
            assert_eq!(path_prefix(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "api", "/api/", "/a b", "/a?b", "/a#b", "//a", "/a//b", "/a/../b", "/é",
        ] {
            assert!(path_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_topology_names() {
        for ok in ["disk", "example.com/gpu", "a_b", "A1"] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/disk", "disk-", "di sk", "disk=ssd"] {
            assert!(label_key(bad).is_err(), "{bad}");
        }
        for ok in ["eu-1", "eu-1a", "worker", "us_east.1"] {
            assert_eq!(topology_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-eu", "eu 1", "eu/1", &"a".repeat(64)] {
            assert!(topology_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn images() {
        for ok in [
            "nginx",
            "registry.example.com:5000/team/web:1.4",
            "web@sha256:abc",
        ] {
            assert_eq!(image(ok), Ok(()), "{ok}");
        }
        for bad in ["", "nginx latest", "nginx\n", "\tnginx"] {
            assert!(image(bad).is_err(), "{bad:?}");
        }
    }
}
