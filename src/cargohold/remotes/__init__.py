"""Registry client: hosts (containerd's hosts.toml), auth, resolve, fetch and the download loop."""
