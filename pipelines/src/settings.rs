//! What the three Stable Diffusion pipelines share: the sizes and models they run with. The
//! defaults are the embedded demo (procedural images, the fixed `pixels` autoencoder and `words`
//! text encoder, a `tiny` random UNet, a few minutes on a laptop); the `topologies/sd2-base-256/`
//! files show the reference's real settings.

use latentflow_engine::{Node, Pipeline, Placement};
use latentflow_operators::demo::SceneStyle;
use latentflow_operators::training::schedule::Prediction;
use latentflow_operators::training::TrainingOptions;
use latentflow_operators::vae_encode::LatentMode;
use latentflow_operators::{
    DemoSourceConfig, ImageTransformConfig, TextEncodeConfig, TokenizeConfig, TrainConfig, VaeEncodeConfig,
};

/// Sizes and models of a pipeline.
///
/// ```
/// let s = latentflow_pipelines::Settings::default();
/// assert_eq!((s.images, s.global_batch_size, s.resolution), (6400, 16, 64));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Procedural demo images to read.
    pub images: u64,
    /// How varied they are (the demo: simple scenes, one large shape on a solid background).
    pub scenes: SceneStyle,
    /// Rows per epoch: the source's batch and the trainer's global batch.
    pub global_batch_size: usize,
    /// Crop size in pixels (latents are 1/8 of it).
    pub resolution: u32,
    /// Model preset of the text encoder and the UNet.
    pub preset: String,
    /// Text encoder preset: `words` (the demo's fixed encoder, so the UNet learns the captions
    /// in minutes) or a model preset such as `tiny` (random CLIP: the real cost, for benchmarks).
    pub text_encoder: String,
    /// VAE preset: `pixels` (the demo's fixed autoencoder, so previews show what was learned)
    /// or a model preset such as `tiny` (random weights: the real VAE's cost, for benchmarks).
    pub autoencoder: String,
    /// VAE latents: sampled (as diffusers trains) or the posterior mean.
    pub latent_mode: LatentMode,
    /// Checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Write a DDIM preview grid every this many steps.
    pub sample_every: u64,
    /// What the UNet predicts: the demo uses v-prediction, whose previews do not saturate
    /// early in training as epsilon's do.
    pub prediction_type: Option<Prediction>,
    /// Training hyperparameters.
    pub training: TrainingOptions,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            images: 6400,
            scenes: SceneStyle::Simple,
            global_batch_size: 16,
            resolution: 64,
            preset: "tiny".into(),
            text_encoder: "words".into(),
            autoencoder: "pixels".into(),
            latent_mode: LatentMode::Sample,
            checkpoint_every: 50,
            sample_every: 100,
            prediction_type: Some(Prediction::VPrediction),
            training: TrainingOptions {
                lr: 2e-3,
                warmup_steps: 10,
                snr_gamma: Some(5.0),
                max_grad_norm: Some(1.0),
                caption_dropout: 0.1,
                ..Default::default()
            },
        }
    }
}

impl Settings {
    /// The nodes the preprocessing and online jobs share: `read` → (`between`'s nodes) →
    /// `transform` → `tokenize` → `vae` → `text` (the encoders on device-owning workers), under
    /// job `name`; returns the pipeline and its `text` node. `read_batch`: the source's rows per
    /// worker (`None` when a trainer's global batch decides it). `between` adds the user's own
    /// steps over the source's rows and returns the node the transform reads.
    pub(crate) fn encoders(
        &self,
        name: &str,
        read_batch: Option<usize>,
        between: impl FnOnce(&mut Pipeline, Node) -> Node,
    ) -> (Pipeline, Node) {
        let mut g = Pipeline::new(name);
        g.job(|job| job.max_epochs_in_flight = 2);
        let read = g.add("read", self.read(read_batch), []);
        let rows = between(&mut g, read);
        let transform = g.add("transform", self.transform(), [rows]);
        let tokenize = g.add("tokenize", self.tokenize(), [transform]);
        let vae = g.add("vae", self.vae(), [tokenize]);
        g.place(vae, Placement::Gpu);
        let text = g.add("text", self.text(), [vae]);
        g.place(text, Placement::Gpu);
        (g, text)
    }

    fn read(&self, batch_size: Option<usize>) -> DemoSourceConfig {
        DemoSourceConfig { count: self.images, batch_size, scenes: self.scenes, ..DemoSourceConfig::default() }
    }

    fn transform(&self) -> ImageTransformConfig {
        ImageTransformConfig { resolution: self.resolution, ..ImageTransformConfig::default() }
    }

    fn tokenize(&self) -> TokenizeConfig {
        TokenizeConfig::default()
    }

    fn vae(&self) -> VaeEncodeConfig {
        VaeEncodeConfig {
            preset: Some(self.autoencoder.clone()),
            mode: self.latent_mode,
            batch_size: self.global_batch_size,
            ..VaeEncodeConfig::default()
        }
    }

    fn text(&self) -> TextEncodeConfig {
        TextEncodeConfig { preset: Some(self.text_encoder.clone()), ..TextEncodeConfig::default() }
    }

    /// The trainer's config in the `online` and `train` jobs.
    ///
    /// ```
    /// let train = latentflow_pipelines::Settings::default().train();
    /// assert_eq!(train.vae_preset.as_deref(), Some("pixels"));
    /// ```
    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            preset: Some(self.preset.clone()),
            text_encoder_preset: Some(self.text_encoder.clone()).filter(|t| *t != self.preset),
            vae_preset: Some(self.autoencoder.clone()).filter(|a| *a != self.preset),
            prediction_type: self.prediction_type,
            global_batch_size: self.global_batch_size,
            checkpoint_every: self.checkpoint_every,
            keep_last: 2,
            resume: Some("latest".into()),
            sample_every: self.sample_every,
            training: self.training.clone(),
            ..TrainConfig::default()
        }
    }
}
