//! The configuration file: TOML text → `File` → checks → typed `Config`. Any text must give
//! either a config or problems, never a panic; a valid file's problems must be none.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wakegate::config::File;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = File::parse(text) else {
        return;
    };
    let problems = file.validate();
    match file.into_config() {
        Ok(config) => {
            assert!(problems.is_empty(), "a config with problems: {problems:?}");
            for target in &config.targets {
                assert!(!target.route.hosts.is_empty());
                if let Some(limit) = target.serving.rate_limit {
                    // The table is built from a valid limit without panicking.
                    let _ = wakegate::target::rate_limit::RateLimiter::new(&limit);
                }
            }
        }
        Err(errors) => assert_eq!(errors, problems),
    }
});
