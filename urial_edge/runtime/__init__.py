"""The runtime: prompt -> tokens -> prefix KV state -> batched engine -> answer text, behind :class:`Assistant`."""
