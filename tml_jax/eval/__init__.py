"""Evaluation: reading Full-Duplex-Bench folders (`samples`), the systems (`systems`,
`baselines`), the Silero VAD (`vad`), the ASR of what each system says (`asr`), the
benchmark's scoring rules (`metrics`), the run itself (`harness`) and the report
(`report`); the CLI is `tml_jax.evaluate`."""
