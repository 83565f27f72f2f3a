//! How an error is shown: its own message, then each cause's, joined by `: ` on one line
//! (as `anyhow` prints with `{:#}`). Errors keep their cause as [`Error::source`] and
//! never repeat it in their own message, so nothing is shown twice and nothing is lost.

use std::{error::Error, fmt};

/// Displays an error with its chain of causes: `outer: cause: root cause`.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// The error and its causes as one string (see [`Chain`]).
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {n}")]
    struct Outer {
        n: u32,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn joins_the_causes() {
        let e = Outer {
            n: 1,
            source: std::io::Error::other("inner"),
        };
        assert_eq!(chain(&e), "outer 1: inner");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
