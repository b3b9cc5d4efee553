//! Fractional GPU slots through the real binary, on the CPU backend (no GPU needed): shares
//! parse, instances sharing a slot all run, the memory figure is stated, and a bad
//! `--gpu-memory` is a usage error.

use crate::support::{Project, TINY};

fn shared(gpu: &str) -> String {
    TINY.replace(
        "    inputs: {data: filtered}\n    params: {epochs: 1, batch_size: 16}\n",
        &format!("    inputs: {{data: filtered}}\n    params: {{epochs: 1, batch_size: 16}}\n    resources: {{gpu: {gpu}, cpu: 1}}\n"),
    )
}

#[test]
fn instances_sharing_one_gpu_slot_all_run_and_the_memory_figure_is_stated() {
    let p = Project::new(&shared("0.5"));
    let r = p.run(&["--gpus", "1", "--jobs", "2"]).ok();
    assert_eq!(r.summary("ran"), 13);
    assert!(r.stdout().contains("note: instances share GPUs; memory per GPU: not limited (the CPU backend"), "{}", r.stdout());
    // Sharing changes no result: the same study with whole GPUs is fully cached.
    p.write(&shared("1"));
    let again = p.run(&["--gpus", "1", "--gpu-memory", "1G"]).ok();
    assert_eq!(again.summary("cached"), 13, "{}", again.stdout());
    assert!(!again.stdout().contains("instances share GPUs"), "no fractions, no note:\n{}", again.stdout());
    p.write(&shared("0.25"));
    // Forced, so that something runs: a fully cached rerun packs nothing and says nothing.
    let given = p.run(&["--gpus", "1", "--gpu-memory", "1.5G", "--force", "retrain"]).ok();
    assert!(given.stdout().contains("memory per GPU: 1.5 GiB (--gpu-memory)"), "{}", given.stdout());

    let bad = p.run(&["--gpu-memory", "lots"]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(bad.stderr().contains("expected a size like 16G"), "{}", bad.stderr());
}
