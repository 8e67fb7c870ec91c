//! Training runs end to end on tiny models: the loss falls, resume is exact, forks and eval
//! read what training writes.

use std::path::{Path, PathBuf};

use pma_lab::checkpoint::{list_checkpoints, read_trainer_state};
use pma_lab::config::{ModelConfig, ModelKind};
use pma_lab::eval::{evaluate, EvalConfig};
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::{train, NoProgress, StepMetrics, TrainConfig, TrainOutcome};
use pma_lab::Error;

fn tiny_model(kind: ModelKind) -> ModelConfig {
    ModelConfig {
        kind,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        num_experts: 4,
        top_k: 2,
        ..ModelConfig::default()
    }
}

fn tiny_run(kind: ModelKind, out: &Path) -> TrainConfig {
    TrainConfig {
        model: tiny_model(kind),
        steps: 6,
        batch_size: 4,
        seq_len: 32,
        lr: 3e-3,
        schedule: ScheduleKind::Wsd,
        warmup_steps: Some(2),
        decay_steps: Some(3),
        save_every: 3,
        seed: 11,
        out_dir: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn loss_falls_on_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    // ~0.25M params: 4 blocks of width 64 with an untied byte head.
    let config = TrainConfig {
        model: ModelConfig {
            hidden_size: 64,
            intermediate_size: 192,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 4,
            ..ModelConfig::default()
        },
        steps: 60,
        batch_size: 8,
        seq_len: 64,
        lr: 1e-2,
        schedule: ScheduleKind::Constant,
        warmup_steps: Some(5),
        save_every: 0,
        out_dir: dir.path().join("run"),
        ..TrainConfig::default()
    };
    let report = train(&config, &NoProgress).unwrap();
    assert!(
        report.n_params > 200_000 && report.n_params < 350_000,
        "{}",
        report.n_params
    );
    assert_eq!(report.checkpoints.len(), 1);
    let eval = evaluate(&report.checkpoints[0], &EvalConfig::default()).unwrap();
    eprintln!("val loss after 60 steps: {:.4}", eval.val_loss);
    // ln 256 = 5.55 nats at init; byte unigrams of English alone are ~3.0.
    // 2.70 on the reference machine.
    assert!(eval.val_loss < 2.8, "val loss {}", eval.val_loss);
    assert!((eval.ppl - eval.val_loss.exp()).abs() < 1e-9);
    assert!((eval.bpb - eval.val_loss / std::f64::consts::LN_2).abs() < 1e-12);
    assert!(eval.accuracy > 0.2, "accuracy {}", eval.accuracy);
    // 60,250 validation bytes in windows of 64 (the training length) predict 63 tokens each.
    assert_eq!(eval.tokens, (60_250 / 64) * 63);
    let again = evaluate(&report.checkpoints[0], &EvalConfig::default()).unwrap();
    assert_eq!(again, eval, "eval is deterministic");
}

#[test]
fn resume_is_bit_identical_dense_and_moe() {
    for kind in [ModelKind::Dense, ModelKind::Moe] {
        let dir = tempfile::tempdir().unwrap();
        let straight = tiny_run(kind, &dir.path().join("straight"));
        train(&straight, &NoProgress).unwrap();

        let mut split = tiny_run(kind, &dir.path().join("split"));
        split.stop_after = Some(3);
        let first = train(&split, &NoProgress).unwrap();
        assert_eq!(first.last_step, 3);
        split.stop_after = None;
        split.resume = true;
        let second = train(&split, &NoProgress).unwrap();
        assert_eq!((second.first_step, second.last_step), (3, 6));

        for file in [
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(
                read(straight.out_dir.join("step-0000006").join(file))
                    == read(split.out_dir.join("step-0000006").join(file)),
                "{kind:?}: {file} differs after resume"
            );
        }
        let metrics = |p: &Path| -> Vec<StepMetrics> {
            std::fs::read_to_string(p.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (a, b) = (metrics(&straight.out_dir), metrics(&split.out_dir));
        assert_eq!(a.len(), 6);
        assert_eq!(b.len(), 6);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.step, x.loss, x.grad_norm, x.lr),
                (y.step, y.loss, y.grad_norm, y.lr)
            );
        }
    }
}

#[test]
fn checkpoints_have_the_hf_layout_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_run(ModelKind::Moe, &dir.path().join("run"));
    train(&config, &NoProgress).unwrap();
    let ckpts = list_checkpoints(&config.out_dir).unwrap();
    assert_eq!(
        ckpts.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![3, 6]
    );
    let step3 = &ckpts[0].1;
    assert!(step3.ends_with("step-0000003"));
    let hf: serde_json::Value = serde_json::from_slice(&read(step3.join("config.json"))).unwrap();
    assert_eq!(hf["architectures"][0], "MixtralForCausalLM");
    assert_eq!(hf["num_local_experts"], 4);
    assert_eq!(hf["max_position_embeddings"], 32);
    let weights = pma_format::Checkpoint::open(step3).unwrap();
    let names: Vec<&str> = weights
        .tensors()
        .iter()
        .map(|t| t.info.name.as_str())
        .collect();
    let want = config.model.param_shapes();
    assert_eq!(names.len(), want.len());
    for (name, shape) in &want {
        let t = weights
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            t.info.shape,
            shape.iter().map(|&d| d as u64).collect::<Vec<_>>()
        );
    }
    let state = read_trainer_state(step3).unwrap();
    assert_eq!((state.step, state.tokens_seen), (3, 3 * 4 * 32));
    assert_eq!(state.data.windows_drawn, 12);
    assert!(
        state.grad_norm.is_finite() && state.train_loss.is_finite() && state.aux_loss.is_some()
    );
    assert!(step3.join("optimizer.safetensors").is_file());
    // A fresh run never overwrites an existing one.
    let err = train(&config, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::RunDirOccupied { .. }), "{err}");
}

#[test]
fn init_forks_a_run_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_run(ModelKind::Dense, &dir.path().join("base"));
    train(&base, &NoProgress).unwrap();
    let src = base.out_dir.join("step-0000003");
    let fork = TrainConfig {
        // The model shape comes from the checkpoint, whatever this says.
        model: ModelConfig::default(),
        init: Some(src.clone()),
        steps: 3,
        warmup_steps: Some(0),
        decay_steps: Some(3),
        save_every: 0,
        out_dir: dir.path().join("fork"),
        ..base.clone()
    };
    let report = train(&fork, &NoProgress).unwrap();
    assert_eq!(
        report.model.to_hf_json(),
        base.model.clone().with_max_position(32).to_hf_json()
    );
    let state = read_trainer_state(&report.checkpoints[0]).unwrap();
    assert_eq!(state.step, 3);
    assert_eq!(state.init_from.as_deref(), Some(src.as_path()));
    // Pure decay: the last LR is min_lr = lr / 10.
    assert!((state.lr - 3e-4).abs() < 1e-12, "{}", state.lr);

    let with_optimizer = TrainConfig {
        init_optimizer: true,
        out_dir: dir.path().join("fork-opt"),
        ..fork.clone()
    };
    train(&with_optimizer, &NoProgress).unwrap();
    let a = read(fork.out_dir.join("step-0000003/model.safetensors"));
    let b = read(
        with_optimizer
            .out_dir
            .join("step-0000003/model.safetensors"),
    );
    assert!(a != b, "loading the optimizer state changes the updates");
}

trait WithMaxPosition {
    fn with_max_position(self, t: usize) -> Self;
}

impl WithMaxPosition for ModelConfig {
    fn with_max_position(mut self, t: usize) -> Self {
        self.max_position_embeddings = t;
        self
    }
}

/// A run that diverges is a result, not an error: the report says at which update, and its
/// curve is exactly what `metrics.jsonl` logged (the diverged update is in neither).
#[test]
fn a_diverging_run_reports_its_outcome_and_curve() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_run(ModelKind::Dense, &dir.path().join("run"));
    // An infinite LR for update 3 poisons the weights, so a later update's loss is not finite.
    config.lr_spike = Some(pma_lab::schedule::LrSpike {
        step: 2,
        factor: f64::INFINITY,
        len_steps: 1,
    });
    let report = train(&config, &NoProgress).unwrap();
    let step = match report.outcome {
        TrainOutcome::Diverged { step, .. } => step,
        TrainOutcome::Completed => panic!("an infinite LR must diverge"),
    };
    assert!((4..=6).contains(&step), "diverged at {step}");
    assert_eq!(report.outcome.diverged_at(), Some(step));
    assert_eq!(report.last_step, step - 1);
    assert_eq!(report.curve.len() as u64, step - 1);
    // Read as plain JSON: the infinite LR of update 3 is logged as null.
    let logged: Vec<serde_json::Value> =
        std::fs::read_to_string(config.out_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(logged.len(), report.curve.len());
    for (a, b) in logged.iter().zip(&report.curve) {
        assert_eq!(a["step"].as_u64(), Some(b.step));
        // serde_json's default float parsing may differ in the last bit.
        let loss = a["loss"].as_f64().unwrap();
        assert!(
            (loss - b.loss).abs() <= 1e-12 * b.loss.abs(),
            "{a} vs {b:?}"
        );
    }
    assert!(matches!(
        report.outcome.into_result(),
        Err(Error::NonFinite { step: s, .. }) if s == step
    ));

    let done = train(
        &tiny_run(ModelKind::Dense, &dir.path().join("fine")),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(done.outcome, TrainOutcome::Completed);
    assert_eq!(
        done.curve.iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    done.outcome.into_result().unwrap();
}
