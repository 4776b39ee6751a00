//! `dreambooth train`: every option as a flag or in a TOML file
//! (`--config run.toml`; flags override the file).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use dreambooth::dreambooth::config::TrainConfig;
use dreambooth::dreambooth::trainer::{Events, train};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Default)]
// Numeric values may be negative (`--prior-loss-weight -1`): rejected by the
// range checks with a message naming the option, not parsed as a flag.
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// A TOML file with any of the options below (snake_case keys); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model: diffusers folder or single-file .safetensors or .ckpt (default: bundled tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A VAE in place of the model's: a diffusers VAE folder, or a file
    /// (original layout or diffusers names, e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Overrides the model's prediction type: epsilon or v_prediction (an SD
    /// 2.x single file is read as the 768-v model; SD 2.x base is epsilon).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Folder with the subject's photos (jpg, png, webp).
    #[arg(long)]
    pub instance_dir: Option<PathBuf>,
    /// Prompt binding the identifier to the subject, e.g. "a photo of sks dog".
    #[arg(long)]
    pub instance_prompt: Option<String>,
    /// Per-photo captions: a photo with a file of this extension beside it
    /// (`dog1.jpg` + `dog1.txt` for `.txt`) trains on the file's text instead
    /// of --instance-prompt (kohya's --caption_extension).
    #[arg(long)]
    pub caption_extension: Option<String>,
    /// Prompt of the subject's class, e.g. "a photo of dog".
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Where class images are cached (default: OUTPUT_DIR/class_images).
    #[arg(long)]
    pub class_dir: Option<PathBuf>,
    /// Train with the class-specific prior-preservation loss.
    #[arg(long)]
    pub with_prior_preservation: bool,
    #[arg(long)]
    pub num_class_images: Option<usize>,
    /// λ, the weight of the prior-preservation loss.
    #[arg(long)]
    pub prior_loss_weight: Option<f64>,
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long)]
    pub center_crop: bool,
    #[arg(long)]
    pub random_flip: bool,
    #[arg(long)]
    pub train_batch_size: Option<usize>,
    #[arg(long)]
    pub max_train_steps: Option<u64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub text_encoder_lr: Option<f64>,
    /// constant | constant_with_warmup | linear | cosine
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    #[arg(long)]
    pub lr_warmup_steps: Option<u64>,
    /// adamw (default) or prodigy (its step size is estimated as it trains:
    /// set --learning-rate 1.0, the multiplier of that estimate).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Prodigy: the step-size estimate's averaging (default √beta2).
    #[arg(long)]
    pub prodigy_beta3: Option<f64>,
    /// Prodigy: multiplier of the estimate (prodigyopt's d_coef; default 1).
    #[arg(long)]
    pub prodigy_d_coef: Option<f64>,
    /// Prodigy: without Adam's bias correction (on by default, as diffusers' advanced script).
    #[arg(long)]
    pub prodigy_no_bias_correction: bool,
    /// Prodigy: without the safeguarded warm-up (on by default).
    #[arg(long)]
    pub prodigy_no_safeguard_warmup: bool,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Also fine-tune the text encoder (own LR: --text-encoder-lr).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Min-SNR-γ loss weighting (e.g. 5.0).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Offset noise strength (e.g. 0.05).
    #[arg(long)]
    pub offset_noise: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub checkpointing_steps: Option<u64>,
    /// Keep the last K checkpoints.
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// Resume from `latest` or a checkpoint folder.
    #[arg(long)]
    pub resume: Option<String>,
    /// A prompt to render every --validation-steps (repeatable: one grid row each).
    #[arg(long)]
    pub validation_prompt: Vec<String>,
    #[arg(long)]
    pub validation_steps: Option<u64>,
    #[arg(long)]
    pub num_validation_images: Option<usize>,
    /// Batch size for class-image generation and validation.
    #[arg(long)]
    pub sample_batch_size: Option<usize>,
    #[arg(long)]
    pub class_sampler: Option<String>,
    #[arg(long)]
    pub class_steps: Option<usize>,
    #[arg(long)]
    pub class_guidance: Option<f64>,
    #[arg(long)]
    pub class_negative_prompt: Option<String>,
    /// Delete class images made for another prompt/model and generate anew.
    #[arg(long)]
    pub regenerate_class_images: bool,
    /// Skip unreadable instance images with a warning instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Also write the original-layout single-file checkpoint.
    #[arg(long)]
    pub save_single_file: bool,
    #[arg(long)]
    pub sample_steps: Option<usize>,
    #[arg(long)]
    pub sample_guidance: Option<f64>,
    /// Train LoRA adapters instead of the model's weights (small files; the
    /// base stays frozen). Wants a higher --learning-rate, e.g. 1e-4.
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank r (default 16).
    #[arg(long = "rank", visible_alias = "lora-rank")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// attn | attn+ff | all-linear, optionally +conv (e.g. attn+conv; default attn).
    /// With --train-text-encoder its q/k/v/out_proj get adapters too.
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// peft (diffusers' pytorch_lora_weights.safetensors), kohya (lora_kohya.safetensors) or both.
    #[arg(long)]
    pub lora_format: Option<String>,
    /// The UNet's compute dtype: no (f32, default), bf16 (GPU) or fp16 (with
    /// dynamic loss scaling); weights and optimizer state stay f32.
    #[arg(long)]
    pub mixed_precision: Option<String>,
    /// Precision of the exported model (OUTPUT_DIR/model/ and, with
    /// --save-single-file, model.safetensors): no (f32, default), fp16 or bf16.
    #[arg(long)]
    pub save_precision: Option<String>,
    /// The UNet's dtype while generating class images: auto (the mixed
    /// precision on a GPU, f32 on the CPU; default), no, bf16 (GPU) or fp16.
    #[arg(long)]
    pub prior_generation_precision: Option<String>,
    /// The UNet's dtype while generating validation images of a full
    /// fine-tune: auto (default, as above), no, bf16 (GPU) or fp16.
    #[arg(long)]
    pub validation_precision: Option<String>,
    /// Recompute each UNet block (and text-encoder layer) in the backward
    /// pass instead of keeping its activations: much less memory for one more
    /// forward per step.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Run the backward one UNet block (and text-encoder layer) at a time,
    /// freeing each block's activations once its gradients exist: same speed
    /// and result, lower peak memory (not with --gradient-checkpointing).
    #[arg(long)]
    pub release_block_graphs: bool,
    /// Update each block's weights as soon as the backward has their
    /// gradients and drop them (kohya's --fused_backward_pass): peak memory
    /// falls by up to the gradients' size; --max-grad-norm then clips
    /// each weight's gradient on its own. Not with gradient accumulation or
    /// fp16.
    #[arg(long)]
    pub fused_backward_pass: bool,
    /// auto (a GPU in a `cuda` build, else the CPU), cpu, cuda or cuda:N.
    /// Not part of the configuration (a run resumes on any device).
    #[arg(long)]
    pub device: Option<String>,
}

macro_rules! set {
    ($cfg:ident, $args:ident, $($f:ident),*) => {
        $( if let Some(v) = $args.$f.clone() { $cfg.$f = v; } )*
    };
}

macro_rules! set_opt {
    ($cfg:ident, $args:ident, $($f:ident),*) => {
        $( if $args.$f.is_some() { $cfg.$f = $args.$f.clone(); } )*
    };
}

macro_rules! set_flag {
    ($cfg:ident, $args:ident, $($f:ident),*) => {
        $( if $args.$f { $cfg.$f = true; } )*
    };
}

/// The effective configuration: the TOML file (if any), then the flags.
pub fn effective_config(args: &Args) -> anyhow::Result<TrainConfig> {
    let mut cfg = match &args.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    set!(
        cfg,
        args,
        instance_dir,
        instance_prompt,
        num_class_images,
        prior_loss_weight,
        output_dir,
        train_batch_size,
        max_train_steps,
        learning_rate,
        lr_warmup_steps,
        prodigy_d_coef,
        adam_beta1,
        adam_beta2,
        adam_weight_decay,
        adam_epsilon,
        max_grad_norm,
        gradient_accumulation_steps,
        offset_noise,
        seed,
        checkpointing_steps,
        checkpoints_total_limit,
        validation_steps,
        num_validation_images,
        sample_batch_size,
        class_sampler,
        class_steps,
        class_guidance,
        class_negative_prompt,
        sample_steps,
        sample_guidance,
        lora_rank,
        lora_dropout,
        lora_targets,
        lora_format,
        mixed_precision,
        save_precision,
        prior_generation_precision,
        validation_precision
    );
    set_opt!(
        cfg,
        args,
        model,
        vae,
        prediction_type,
        caption_extension,
        class_prompt,
        class_dir,
        resolution,
        text_encoder_lr,
        snr_gamma,
        resume,
        prodigy_beta3,
        lora_alpha
    );
    if args.prodigy_no_bias_correction {
        cfg.prodigy_use_bias_correction = false;
    }
    if args.prodigy_no_safeguard_warmup {
        cfg.prodigy_safeguard_warmup = false;
    }
    if !args.validation_prompt.is_empty() {
        cfg.validation_prompt = args.validation_prompt.clone();
    }
    set_flag!(
        cfg,
        args,
        with_prior_preservation,
        center_crop,
        random_flip,
        train_text_encoder,
        regenerate_class_images,
        skip_bad_images,
        save_single_file,
        lora,
        gradient_checkpointing,
        release_block_graphs,
        fused_backward_pass
    );
    if let Some(s) = &args.optimizer {
        cfg.optimizer = s.parse()?;
    }
    if let Some(s) = &args.lr_scheduler {
        cfg.lr_scheduler = s
            .parse()
            .map_err(|e: String| anyhow::anyhow!("invalid option: {e}"))?;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    let device = super::device::select(args.device.as_deref())?;
    println!("# effective configuration\n{}", cfg.to_toml());
    println!("# device: {}", super::device::describe(&device));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to abort)"
            );
        });
    }
    let bar = ProgressBar::new(cfg.max_train_steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {msg} {per_sec} ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    let mut log = |line: &str| bar.suspend(|| println!("{line}"));
    let mut on_step = |s: &dreambooth::dreambooth::trainer::StepInfo| {
        bar.set_position(s.step);
        let prior = s
            .loss_prior
            .map(|p| format!(" prior {p:.4}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4} (inst {:.4}{prior}) lr {:.2e}",
            s.loss, s.loss_instance, s.lr
        ));
    };
    let mut ev = Events {
        log: &mut log,
        step: &mut on_step,
        stop: &stop,
    };
    let (_, outcome) = train(&cfg, &device, &mut ev).context("training failed")?;
    bar.finish_and_clear();
    if outcome.interrupted {
        println!(
            "stopped at step {}; resume with --resume latest",
            outcome.final_step
        );
        std::process::exit(130);
    }
    if let Some(f) = outcome.lora_files.first() {
        println!(
            "done: {} steps; LoRA weights in {}\ntry: dreambooth generate {}--lora {} --prompt \"{}\" --out samples",
            outcome.final_step,
            cfg.output_dir.display(),
            cfg.model
                .as_deref()
                .map(|p| format!("--model {} ", p.display()))
                .unwrap_or_default(),
            f.display(),
            cfg.instance_prompt
        );
    }
    if let Some(dir) = outcome.model_dir {
        println!(
            "done: {} steps; trained model in {}\ntry: dreambooth generate --model {} --prompt \"{}\" --out samples",
            outcome.final_step,
            dir.display(),
            dir.display(),
            cfg.instance_prompt
        );
    }
    Ok(())
}
