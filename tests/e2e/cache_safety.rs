//! The cache under attack and under interruption: edited records, digests that are paths,
//! gc during a run, SIGTERM, interrupted forced reruns, group-shared modes, bad sizes and
//! unwritable cache files.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{BIN, Project, TINY, files_under};

/// The still-open stdout of a run: dropping it would end the run by a broken pipe.
type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// TINY with a training of a few seconds.
fn slow_tiny() -> String {
    TINY.replace("params: {epochs: 1, batch_size: 16}\n  cams", "params: {epochs: 100, batch_size: 16}\n  cams")
}

/// The record file of the instance `label`, and its JSON.
fn record_of(p: &Project, label: &str) -> (PathBuf, Value) {
    for e in std::fs::read_dir(p.cache().join("actions")).expect("actions dir").flatten() {
        let v: Value = serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("json");
        if v["label"] == label {
            return (e.path(), v);
        }
    }
    panic!("no record for {label}");
}

/// Sets `record_digest` to the digest of the rest of the record, as the cache documents it
/// (SHA-256 of the compact JSON with sorted keys): what someone who knows the format can forge.
fn reseal(v: &mut Value) {
    let m = v.as_object_mut().expect("object");
    m.remove("record_digest");
    let d = hex::encode(Sha256::digest(serde_json::to_vec(v).expect("json")));
    v.as_object_mut().expect("object").insert("record_digest".into(), Value::String(d));
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("json")).expect("write record");
}

/// The cache key of `label` as `plan --json` reports it. The cache folders are made first (as
/// a run would make them): tests plant things in them, and `plan` never creates a cache.
fn key_of(p: &Project, label: &str) -> String {
    for d in ["actions", "objects", "locks", "tmp"] {
        std::fs::create_dir_all(p.cache().join(d)).unwrap();
    }
    let out = p.camflow(&["plan", p.pipeline().to_str().unwrap(), "--json"]).ok().stdout();
    let v: Value = serde_json::from_str(&out).expect("plan json");
    v["instances"].as_array().expect("instances").iter().find(|i| i["instance"] == label).expect("instance")["key"]
        .as_str()
        .expect("key")
        .to_string()
}

/// Scratch folders of runs in the cache's tmp/.
fn scratch_dirs(p: &Project) -> Vec<String> {
    std::fs::read_dir(p.cache().join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("run-")).collect())
        .unwrap_or_default()
}

/// Starts `camflow run` with `extra` args and follows it until `stage` is running and its
/// scratch folder exists; returns the child and the rest of its stdout.
fn start_until_running(p: &Project, extra: &[&str], stage: &str) -> (Child, Lines) {
    let pl = p.pipeline();
    let cache = p.cache();
    let mut args = vec!["run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()];
    args.extend(extra);
    let mut child = p.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let prefix = format!("run     {stage} ");
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let started = line.starts_with(&prefix);
        seen.push(line);
        if started {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.starts_with(&prefix)), "{stage} never started: {seen:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while scratch_dirs(p).is_empty() {
        assert!(Instant::now() < deadline, "no scratch folder appeared for {stage}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, lines)
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
}

#[test]
fn an_edited_metric_is_caught_by_verify_and_by_run_and_never_reaches_the_lock() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let label = "cls[mode=inverse]";
    let (path, original) = record_of(&p, label);
    let forge = |v: &Value| {
        let mut v = v.clone();
        v["metrics"]["accuracy"] = Value::from(0.123456789);
        v
    };
    // verify reports it and removes it; the next run recomputes exactly that instance.
    write_json(&path, &forge(&original));
    let v = p.camflow(&["verify"]);
    assert_eq!(v.code(), 3, "{}", v.stdout());
    assert!(v.stdout().lines().any(|l| l.starts_with("problem: record ") && l.contains("edited or damaged")), "{}", v.stdout());
    assert!(!path.exists(), "the corrupt record is removed");
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), vec![label]);
    // run alone catches it too (plan says why) and the lock holds the computed value.
    write_json(&path, &forge(&record_of(&p, label).1));
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok().stdout();
    assert!(plan.lines().any(|l| l.starts_with(&format!("run     {label}")) && l.contains("cache entry corrupt")), "{plan}");
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), vec![label]);
    let lock = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    assert!(!lock.contains("0.123456789"), "{lock}");
    assert_eq!(record_of(&p, label).1["metrics"], original["metrics"]);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn a_digest_read_from_the_cache_never_becomes_a_path() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // A file outside the cache folder, and records (with valid record digests) that name it.
    let victim = p.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let label = "masks[value=0.3]";
    let (path, original) = record_of(&p, label);
    let forged = |digest: &str| {
        let mut v = original.clone();
        v["outputs"]["masks.bin"]["digest"] = Value::from(digest);
        reseal(&mut v);
        v
    };
    let as_path = format!("xx{}", victim.display());
    let non_ascii = "é".repeat(32);
    for digest in [as_path.as_str(), non_ascii.as_str()] {
        write_json(&path, &forged(digest));
        let v = p.camflow(&["verify"]);
        assert_eq!(v.code(), 3, "{digest}: {}\n{}", v.stdout(), v.stderr());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "verify must not touch a file outside the cache");
        assert!(v.stdout().contains("is not a SHA-256 digest"), "{}", v.stdout());
        write_json(&path, &forged(digest));
        let r = p.run(&[]).ok();
        assert_eq!(r.ran(), vec![label]);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "run must not touch a file outside the cache");
    }
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn gc_during_a_run_waits_or_refuses_and_the_run_finishes_whole() {
    let p = Project::new(&slow_tiny());
    let (run, rest) = start_until_running(&p, &[], "train");
    // Plain gc refuses at once and removes nothing.
    let g = p.camflow(&["gc"]);
    assert_eq!(g.code(), 6, "{}\n{}", g.stdout(), g.stderr());
    assert!(g.stderr().contains("is in use by a running `camflow run`"), "{}", g.stderr());
    assert!(!scratch_dirs(&p).is_empty(), "the running job's scratch folder is still there");
    // gc --wait waits for the run, then collects.
    let cache = p.cache();
    let waiting = p.cmd(&["gc", "--wait", "--cache-dir", cache.to_str().unwrap()]).stdout(Stdio::piped()).spawn().expect("gc");
    let rest: Vec<String> = rest.map(|l| l.expect("line")).collect();
    let out = run.wait_with_output().expect("run");
    assert!(out.status.success(), "{rest:?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(rest.iter().any(|l| l.starts_with("summary: ran=13 ")), "{rest:?}");
    let g = waiting.wait_with_output().expect("gc --wait");
    assert!(g.status.success());
    assert!(String::from_utf8_lossy(&g.stdout).contains("gc: removed 0 records"), "{}", String::from_utf8_lossy(&g.stdout));
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
    assert_eq!(p.run(&[]).ok().summary("cached"), 13);
}

#[test]
fn sigterm_is_handled_like_ctrl_c_and_the_next_run_cleans_the_scratch() {
    let p = Project::new(&slow_tiny());
    let (run, rest) = start_until_running(&p, &[], "train");
    signal(&run, "-TERM");
    let rest: Vec<String> = rest.map(|l| l.expect("line")).collect();
    assert!(rest.iter().any(|l| l.starts_with("summary: ran=1 cached=0")), "{rest:?}");
    let out = run.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("terminated (SIGTERM); finished work is cached and the next run resumes"), "{stderr}");
    // No partial entry; the abandoned scratch folder is still there until the next run.
    assert_eq!(std::fs::read_dir(p.cache().join("actions")).unwrap().count(), 1);
    assert!(!scratch_dirs(&p).is_empty());
    let r = p.run(&[]).ok();
    assert_eq!((r.summary("cached"), r.summary("ran")), (1, 12));
    assert_eq!(scratch_dirs(&p), Vec::<String>::new(), "the interrupted run's scratch folder is removed");
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn sighup_stops_a_run_as_cleanly_as_ctrl_c() {
    // The ssh session closed: the run says so, exits 129, and the next run resumes.
    let p = Project::new(&slow_tiny());
    let (run, rest) = start_until_running(&p, &[], "train");
    signal(&run, "-HUP");
    let rest: Vec<String> = rest.map(|l| l.expect("line")).collect();
    assert!(rest.iter().any(|l| l.starts_with("summary: ran=1 cached=0")), "{rest:?}");
    let out = run.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(129), "{stderr}");
    assert!(stderr.contains("hung up (SIGHUP"), "{stderr}");
    let r = p.run(&[]).ok();
    assert_eq!((r.summary("cached"), r.summary("ran")), (1, 12));
}

#[test]
fn an_interrupted_forced_rerun_keeps_the_old_result() {
    let yaml = "name: two\nseed: 7\nstages:\n  data:\n    kind: data\n    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}\n  train:\n    kind: train\n    inputs: {data: data}\n    params: {epochs: 100, batch_size: 16}\n";
    let p = Project::new(yaml);
    assert_eq!(p.run(&[]).ok().summary("ran"), 2);
    let (before, _) = record_of(&p, "train");
    let before = std::fs::read(before).unwrap();
    let (run, rest) = start_until_running(&p, &["--force", "train"], "train");
    signal(&run, "-INT");
    let _: Vec<String> = rest.map(|l| l.expect("line")).collect();
    let out = run.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    // The valid record survived the interrupted forced rerun.
    assert_eq!(std::fs::read(record_of(&p, "train").0).unwrap(), before);
    let r = p.run(&[]).ok();
    assert_eq!((r.summary("cached"), r.summary("ran")), (2, 0));
}

#[cfg(unix)]
#[test]
fn a_group_shared_cache_respects_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let cache = p.cache();
    let out = Command::new("sh")
        .args(["-c", "umask 002 && exec \"$0\" \"$@\"", BIN, "run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()])
        .current_dir(p.path())
        .env_remove("CAMFLOW_CACHE")
        .output()
        .expect("sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let modes = |dir: &str| -> Vec<(String, u32)> {
        let v: Vec<(String, u32)> = files_under(&cache.join(dir))
            .into_iter()
            .map(|f| (f.display().to_string(), std::fs::symlink_metadata(&f).unwrap().permissions().mode() & 0o777))
            .collect();
        assert!(!v.is_empty(), "{dir} is empty");
        v
    };
    for dir in ["actions", "names", "logs", "locks"] {
        for (f, m) in modes(dir) {
            assert_eq!(m, 0o664, "{f}: {m:o}");
        }
    }
    for (f, m) in modes("objects") {
        assert_eq!(m, 0o444, "{f}: {m:o}");
    }
}

#[test]
fn a_record_that_cannot_be_read_is_an_error_not_a_miss() {
    let p = Project::new(TINY);
    let key = key_of(&p, "data");
    // Something that is there but cannot be read as a file (a chmod would not stop root).
    let rec = p.cache().join("actions").join(format!("{key}.json"));
    std::fs::create_dir(&rec).unwrap();
    let r = p.run(&[]);
    assert_eq!(r.code(), 5, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains(&rec.display().to_string()), "{}", r.stderr());
    assert!(r.ran().is_empty(), "{}", r.stdout());
}

#[test]
fn gc_max_size_overflow_is_a_clear_error() {
    let p = Project::new(TINY);
    let g = p.camflow(&["gc", "--max-size", "99999999999999999G"]);
    assert_eq!(g.code(), 2, "{}", g.stderr());
    assert!(g.stderr().contains("--max-size 99999999999999999G: too large"), "{}", g.stderr());
}

#[test]
fn an_unwritable_cache_file_is_an_io_error_naming_it() {
    let p = Project::new(TINY);
    let key = key_of(&p, "data");
    // The key's lock file cannot be opened for writing (as on a read-only cache; a folder in
    // its place fails for root too).
    let lock = p.cache().join("locks").join(format!("{key}.lock"));
    std::fs::create_dir(&lock).unwrap();
    let r = p.run(&[]);
    assert_eq!(r.code(), 5, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains(&lock.display().to_string()), "{}", r.stderr());
}

// ---- Review of issue 8: links, FIFOs and devices, unreadable records, gc's report. ----

/// Runs `cmd` with a deadline: a hang is a test failure (the child is killed), never a stuck
/// test. Returns (exit code, stdout, stderr).
fn bounded(mut cmd: Command, secs: u64) -> (i32, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn camflow");
    let end = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung for {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `camflow <args> --cache-dir <cache>` of `p`, as a command.
fn cmd_of(p: &Project, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    c.args(["--cache-dir", p.cache().to_str().expect("utf-8")]);
    c
}

#[cfg(unix)]
#[test]
fn links_inside_the_cache_are_never_followed() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let victim = tempfile::tempdir().unwrap();
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    // Dangling links in place of the cache lock, then of a key lock: following them would
    // create files in the victim folder.
    let cache_lock = p.cache().join("locks/cache.lock");
    std::fs::remove_file(&cache_lock).unwrap();
    std::os::unix::fs::symlink(victim.path().join("c"), &cache_lock).unwrap();
    let r = p.run(&["--force", "data"]);
    assert_eq!(r.code(), 5, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains(&cache_lock.display().to_string()) && r.stderr().contains("symbolic link"), "{}", r.stderr());
    std::fs::remove_file(&cache_lock).unwrap();
    let key_lock = p.cache().join("locks").join(format!("{}.lock", key_of(&p, "data")));
    let _ = std::fs::remove_file(&key_lock);
    std::os::unix::fs::symlink(victim.path().join("k"), &key_lock).unwrap();
    let r = p.run(&["--force", "data"]);
    assert_eq!(r.code(), 5, "{}\n{}", r.stdout(), r.stderr());
    assert!((r.stdout() + &r.stderr()).contains(&key_lock.display().to_string()), "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0, "files were created outside the cache");
    std::fs::remove_file(&key_lock).unwrap();
    // tmp/ replaced by a link to a folder holding old files and a scratch-like folder.
    let old = victim.path().join("old.txt");
    std::fs::write(&old, "precious").unwrap();
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    let scratch = victim.path().join(format!("run-{}-X", "a".repeat(64)));
    std::fs::create_dir(&scratch).unwrap();
    std::fs::remove_dir_all(p.cache().join("tmp")).unwrap();
    std::os::unix::fs::symlink(victim.path(), p.cache().join("tmp")).unwrap();
    for args in [vec!["gc"], vec!["gc", pl], vec!["run", pl], vec!["verify"]] {
        let r = p.camflow(&args);
        assert_eq!(r.code(), 5, "{args:?}: {}\n{}", r.stdout(), r.stderr());
        assert!(r.stderr().contains(&p.cache().join("tmp").display().to_string()), "{}", r.stderr());
    }
    assert!(old.exists() && scratch.exists(), "gc deleted files outside the cache");
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().expect("mkfifo").success());
}

#[cfg(unix)]
#[test]
fn a_fifo_in_place_of_a_record_never_hangs_a_command() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    let rec = p.cache().join("actions").join(format!("{}.json", key_of(&p, "data")));
    let fifo = || {
        let _ = std::fs::remove_file(&rec);
        mkfifo(&rec);
    };
    fifo();
    let (code, out, err) = bounded(cmd_of(&p, &["plan", pl]), 60);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("not a regular file"), "{out}");
    let (code, out, err) = bounded(cmd_of(&p, &["verify"]), 60);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains(&rec.display().to_string()) && out.contains("not a regular file"), "{out}");
    fifo();
    let (code, out, err) = bounded(cmd_of(&p, &["gc", pl]), 60);
    assert_eq!(code, 0, "{out}\n{err}");
    fifo();
    let (code, out, err) = bounded(cmd_of(&p, &["run", pl]), 300);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(std::fs::symlink_metadata(&rec).unwrap().is_file(), "the run wrote a real record in its place");
    let (code, out, err) = bounded(cmd_of(&p, &["verify"]), 60);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_in_the_data_are_bad_files_not_hangs() {
    let spec = |extra: &str| {
        format!(
            "name: lgg\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {{source: lgg, root: lgg, channel: flair, image_size: 8{extra}}}\n"
        )
    };
    let p = Project::new(&spec(", on_error: skip"));
    let root = p.path().join("lgg");
    crate::support::write_lgg(&root, &["P1", "P2", "P3"], 2, 0);
    mkfifo(&root.join("P1/P1_40.tif"));
    std::os::unix::fs::symlink("/dev/zero", root.join("P2/P2_40.tif")).unwrap();
    // With their masks, so that it is the image itself that is refused.
    std::fs::copy(root.join("P1/P1_1_mask.tif"), root.join("P1/P1_40_mask.tif")).unwrap();
    std::fs::copy(root.join("P2/P2_1_mask.tif"), root.join("P2/P2_40_mask.tif")).unwrap();
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    let (code, out, err) = bounded(cmd_of(&p, &["plan", pl]), 60);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = bounded(cmd_of(&p, &["run", pl]), 300);
    assert_eq!(code, 0, "{out}\n{err}");
    let lock = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    assert!(lock.contains("skipped: 2") && lock.contains("P1_40.tif") && lock.contains("P2_40.tif"), "{lock}");
    // Without skip: a stage error naming the file.
    p.write(&spec(""));
    let (code, out, err) = bounded(cmd_of(&p, &["run", pl]), 300);
    assert_eq!(code, 1, "{out}\n{err}");
    let all = out + &err;
    assert!(all.contains("P1_40.tif: cannot read: not a regular file") && all.contains("P2_40.tif"), "{all}");
    // A manifest naming /dev/zero and a FIFO.
    let m = Project::new(
        "name: man\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {source: manifest, manifest: m.csv, missing_masks: exclude, image_size: 8, on_error: skip}\n",
    );
    crate::support::write_folders(m.path(), &["imgs"], 4);
    mkfifo(&m.path().join("imgs/fifo.png"));
    std::fs::write(
        m.path().join("m.csv"),
        "image,label,group\nimgs/img0.png,1,a\nimgs/img1.png,0,b\nimgs/img2.png,1,c\nimgs/img3.png,0,d\n/dev/zero,1,e\nimgs/fifo.png,0,f\n",
    )
    .unwrap();
    let pl = m.pipeline();
    let (code, out, err) = bounded(cmd_of(&m, &["plan", pl.to_str().unwrap()]), 60);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = bounded(cmd_of(&m, &["run", pl.to_str().unwrap()]), 300);
    assert!(code == 0 || code == 1, "{code}: {out}\n{err}");
}

#[test]
fn an_unreadable_record_stops_plan_status_and_show_like_run() {
    let p = Project::new(TINY);
    let key = key_of(&p, "data");
    let rec = p.cache().join("actions").join(format!("{key}.json"));
    std::fs::create_dir(&rec).unwrap();
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    for args in [vec!["plan", pl], vec!["status", pl], vec!["show", pl], vec!["run", pl]] {
        let r = p.camflow(&args);
        assert_eq!(r.code(), 5, "{args:?}: {}\n{}", r.stdout(), r.stderr());
        assert!(r.stderr().contains(&rec.display().to_string()), "{args:?}: {}", r.stderr());
    }
}

#[test]
fn an_output_name_that_is_a_path_makes_the_record_corrupt() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let label = "masks[value=0.3]";
    let (path, mut v) = record_of(&p, label);
    let o = v["outputs"].as_object_mut().unwrap();
    let r = o.remove("masks.bin").expect("output");
    o.insert("../../../../tmp/x".into(), r);
    reseal(&mut v);
    write_json(&path, &v);
    let r = p.camflow(&["verify"]);
    assert_eq!(r.code(), 3, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("not a plain file name"), "{}", r.stdout());
    write_json(&path, &v);
    assert_eq!(p.run(&[]).ok().ran(), vec![label]);
}

/// gc on a cache it cannot write reports only what it really removed. As root (who ignores
/// permissions) the gc runs as `nobody` through setpriv; otherwise the folders are made
/// read-only.
#[cfg(target_os = "linux")]
#[test]
fn gc_on_a_read_only_cache_reports_only_what_it_removed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // Another pipeline: nothing of TINY's is kept.
    let other = p.path().join("other.yaml");
    std::fs::write(&other, TINY.replace("seed: 7", "seed: 8")).unwrap();
    let root = std::fs::metadata(p.path()).unwrap().uid() == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        std::fs::set_permissions(p.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        c
    } else {
        for d in ["actions", "objects"] {
            std::fs::set_permissions(p.cache().join(d), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        for e in std::fs::read_dir(p.cache().join("objects")).unwrap().flatten() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        Command::new(BIN)
    };
    cmd.current_dir(p.path()).env_remove("CAMFLOW_CACHE").args(["gc", other.to_str().unwrap(), "--cache-dir", p.cache().to_str().unwrap()]);
    let before = std::fs::read_dir(p.cache().join("actions")).unwrap().count();
    let (code, out, err) = bounded(cmd, 60);
    assert_eq!(code, 5, "{out}\n{err}");
    assert!(out.contains("gc: removed 0 records and 0 objects, 0 B freed"), "{out}");
    assert!(err.contains("could not remove"), "{err}");
    assert_eq!(std::fs::read_dir(p.cache().join("actions")).unwrap().count(), before);
}

#[cfg(unix)]
#[test]
fn a_link_in_place_of_an_object_is_replaced_by_a_run_and_removed_by_verify_and_gc() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let victim = tempfile::tempdir().unwrap();
    let target = victim.path().join("model");
    std::fs::write(&target, "precious").unwrap();
    let obj = p.object_of("train", "model.safetensors");
    std::fs::remove_file(&obj).unwrap();
    std::os::unix::fs::symlink(&target, &obj).unwrap();
    // The rerun stores the model in the link's place: the link goes, never its target.
    p.run(&["--force", "train"]).ok();
    assert!(std::fs::symlink_metadata(&obj).unwrap().is_file());
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
    // A link no record names: verify removes it and names it.
    let stray = obj.with_file_name("0".repeat(62));
    std::os::unix::fs::symlink(&target, &stray).unwrap();
    let v = p.camflow(&["verify"]);
    assert_eq!(v.code(), 3, "{}", v.stdout());
    assert!(v.stdout().contains(&format!("{}: a link or special file", stray.display())), "{}", v.stdout());
    assert!(std::fs::symlink_metadata(&stray).is_err());
    // And gc.
    std::os::unix::fs::symlink(&target, &stray).unwrap();
    let g = p.camflow(&["gc"]).ok().stdout();
    assert!(g.contains("; 1 links or special files in objects/ removed"), "{g}");
    assert!(std::fs::symlink_metadata(&stray).is_err());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[cfg(unix)]
#[test]
fn a_linked_names_folder_is_never_read_nor_written() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // names/tiny (sidecars, lock state) moved outside the cache and linked back.
    let outside = tempfile::tempdir().unwrap();
    let names = p.cache().join("names").join("tiny");
    let moved = outside.path().join("tiny");
    std::fs::rename(&names, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &names).unwrap();
    let contents = || {
        let mut v: Vec<(PathBuf, Vec<u8>)> = files_under(&moved).into_iter().map(|f| (f.clone(), std::fs::read(f).unwrap())).collect();
        v.sort();
        v
    };
    let before = contents();
    assert!(!before.is_empty());
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    // The sidecar outside would explain the change: it is not read.
    let plan = p.camflow(&["plan", pl, "--set", "stages.train.params.epochs=2"]).ok().stdout();
    assert!(plan.contains("run     train") && !plan.contains("params changed"), "{plan}");
    p.run(&["--set", "stages.train.params.epochs=2"]).ok();
    p.run(&[]).ok();
    assert_eq!(contents(), before, "files outside the cache were written");
}

#[test]
fn a_record_whose_key_inputs_are_not_its_keys_is_corrupt_to_run() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // Resealed, so its record digest holds: only the key inputs give it away.
    let (path, mut v) = record_of(&p, "cams");
    v["key_inputs"]["seed"] = Value::from(99);
    reseal(&mut v);
    write_json(&path, &v);
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok().stdout();
    assert!(plan.contains("cache entry corrupt") && plan.contains("key inputs hash to"), "{plan}");
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), ["cams"], "{}", r.stdout());
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

/// A link where a key's lock file belongs stops every run (links in the cache are never
/// followed); `verify` names it and removes it (the link, never its target), and the next run
/// goes through.
#[test]
fn verify_removes_a_link_in_place_of_a_lock_file() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let key = key_of(&p, "data");
    let victim = p.path().join("victim.txt");
    std::fs::write(&victim, "outside the cache").unwrap();
    let lock = p.cache().join("locks").join(format!("{key}.lock"));
    let _ = std::fs::remove_file(&lock);
    std::os::unix::fs::symlink(&victim, &lock).unwrap();
    let r = p.run(&["--force", "data"]);
    assert_eq!(r.code(), 5, "{}\n{}", r.stdout(), r.stderr());
    let v = p.camflow(&["verify"]);
    assert_eq!(v.code(), 3, "{}", v.stdout());
    assert!(v.stdout().contains("a link or special file where lock files are kept (never followed); removed"), "{}", v.stdout());
    assert!(std::fs::symlink_metadata(&lock).is_err(), "the link is gone");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "outside the cache", "its target untouched");
    p.run(&["--force", "data"]).ok();
    p.camflow(&["verify"]).ok();
}
