//! The container runtime (Docker Engine API: Docker or Podman's API service).
