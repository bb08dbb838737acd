"""The registry client: the only part of lazysnap that talks HTTP.

    async with RegistryClient(RegistryOptions(...)) as client:
        manifest = await client.resolve("docker.io/library/busybox:latest")
        blob = await client.open_blob(manifest.ref, manifest.layers[0].digest)
        data = await client.read_ranges(blob, [(0, 4096), (1 << 20, (1 << 20) + 4096)])
        socis = await client.referrers(manifest.ref, manifest.digest, "application/vnd.amazon.soci.index.v1+json")

It also pushes (`push_blob`, `push_manifest`, `push_referrer`, `update_referrers_tag`),
to the first endpoint hosts.toml trusts with `push`.

The package imports nothing itself: `registry.options` and `registry.errors` are light,
and the command line imports them without paying for httpx and the client.
"""
