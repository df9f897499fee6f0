//! How the binaries' memory is paged.

/// Turns transparent huge pages off for this process and the threads and children it starts
/// (Linux; elsewhere it does nothing and answers `Ok`).
///
/// Herald's binaries allocate through mimalloc, which touches fresh memory as it needs it and
/// gives unused pages back to the kernel a second after they were freed. Where the kernel's THP
/// setting is `always`, the first touch of a 2 MiB-aligned range faults in a whole huge page,
/// which the kernel zeroes first; pages given back and touched again are zeroed again. During
/// `throughput` that zeroing (`clear_page_erms` under `do_huge_pmd_anonymous_page`) was 4.5% of
/// the control plane's CPU (docs/BENCHMARKS.md, item 31). With small pages a fault zeroes 4 KiB.
///
/// It applies to every page touched after the call, so `main` calls it before anything of its
/// own; only what the Tokio runtime touched while starting is already in huge pages.
pub fn no_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
