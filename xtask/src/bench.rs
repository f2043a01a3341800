pub fn proxy() -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
