//! `expo completions` and `expo man`, run as a user would.

use std::process::Command;

use crate::common::expo;

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn bash_completions_load() {
    if !have("bash") {
        eprintln!("skipped: no bash");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_expo"));
    let o = Command::new("bash")
        .arg("-c")
        .arg("source <(expo completions bash) && complete -p expo")
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("-F _expo expo"), "{stdout}");

    // And they complete: subcommands after `expo`, flags after `expo extrapolate --al`.
    let o = Command::new("bash")
        .arg("-c")
        .arg(
            "source <(\"$EXPO\" completions bash) && \
             COMP_WORDS=(expo ext) COMP_CWORD=1 COMP_LINE='expo ext' COMP_POINT=8 && _expo expo ext expo && echo \"${COMPREPLY[@]}\" && \
             COMP_WORDS=(expo extrapolate --al) COMP_CWORD=2 && _expo expo --al extrapolate && echo \"${COMPREPLY[@]}\"",
        )
        .env("EXPO", bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"extrapolate"), "{stdout}");
    assert!(
        lines.get(1).is_some_and(|l| l.contains("--aligned")),
        "{stdout}"
    );
}

#[test]
fn every_shell_has_a_script() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let text = expo(&["completions", shell]).assert_ok().stdout;
        assert!(
            text.contains("extrapolate") && text.contains("--sft"),
            "{shell}"
        );
    }
    expo(&["completions", "tcsh"]).assert_fails(2, &["tcsh"]);
}

#[test]
fn man_pages() {
    let page = expo(&["man"]).assert_ok().stdout;
    assert!(page.contains(".TH expo 1"), "{page}");
    assert!(page.contains("expo\\-extrapolate(1)"), "{page}");

    let page = expo(&["man", "extrapolate"]).assert_ok().stdout;
    assert!(page.contains(".TH expo-extrapolate 1"), "{page}");
    assert!(page.contains("\\-\\-max\\-shard\\-size"), "{page}");

    expo(&["man", "nope"]).assert_fails(2, &["nope"]);

    let dir = tempfile::tempdir().unwrap();
    expo(&["man", "--dir", dir.path().to_str().unwrap()]).assert_ok();
    for name in [
        "expo.1",
        "expo-extrapolate.1",
        "expo-completions.1",
        "expo-man.1",
    ] {
        assert!(dir.path().join(name).is_file(), "{name}");
    }
}
