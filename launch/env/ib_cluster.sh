# Example site settings for an InfiniBand cluster (adapt the interface and HCA names).
source "$(dirname "${BASH_SOURCE[0]}")/gpu.sh"
# The network interface NCCL's bootstrap and sockets use (ip -br link shows the names).
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-ib0}"
# The HCAs for RDMA traffic; leave unset to let NCCL pick all of them.
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
# GPUDirect RDMA when NIC and GPU share a PCIe switch.
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
# Print NCCL's ring/tree setup once at start (set to INFO when debugging hangs).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
