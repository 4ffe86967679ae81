//! Model errors: each names the file, tensor or config field at fault.

use std::path::PathBuf;

/// Why a model could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file is missing or unreadable.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weights file lacks a tensor the config needs.
    #[error("{}: missing tensor `{name}` (shape {expected:?})", origin.display())]
    MissingTensor {
        /// The weights file(s).
        origin: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor has another shape than the config implies.
    #[error("{}: tensor `{name}` has shape {found:?}, the config needs {expected:?}", origin.display())]
    Shape {
        /// The weights file(s).
        origin: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A config value this implementation does not support.
    #[error("{}: `{field}` = {value} is not supported ({supported})", origin.display())]
    Unsupported {
        /// The config file.
        origin: PathBuf,
        /// The field.
        field: String,
        /// Its value.
        value: String,
        /// What is supported.
        supported: String,
    },
    /// A config file with values this implementation cannot run: every problem, one per line.
    #[error("{}", ConfigProblem::lines(origin, problems))]
    Config {
        /// The config file.
        origin: PathBuf,
        /// Each bad field.
        problems: Vec<ConfigProblem>,
    },
    /// Bad input to a model or to training (shapes, options, a non-finite loss).
    #[error("{0}")]
    Input(String),
    /// Data-parallel replicas could not agree (a collective failed, or they diverged).
    #[error("data-parallel training: {0}")]
    Replicas(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Results of model code.
pub type Result<T> = std::result::Result<T, ModelError>;

/// One bad field of a model config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The field.
    pub field: String,
    /// Its value.
    pub value: String,
    /// What is supported.
    pub supported: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` = {} is not supported ({})", self.field, self.value, self.supported)
    }
}

impl ConfigProblem {
    fn lines(origin: &std::path::Path, problems: &[ConfigProblem]) -> String {
        let lines: Vec<String> = problems.iter().map(|p| format!("{}: {p}", origin.display())).collect();
        lines.join("\n")
    }
}
