# Settings for CPU-only runs (gloo). One intra-op thread per rank: ranks share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# gloo binds to the loopback/first interface; name it when the host has several.
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
