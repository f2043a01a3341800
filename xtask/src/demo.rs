pub fn run(_keep: bool) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
