//! TODO(helper)
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
