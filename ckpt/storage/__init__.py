"""The storage contract on any fsspec URL: store, manifest, commit, retries, retention, leases."""
