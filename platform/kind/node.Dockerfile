# A kind node image on Debian bookworm (systemd 252 still runs on cgroup v1 hosts), built by images.sh from
# kind's own node files (its module's images/base/files, copied into the build context as files/) with Debian's
# containerd, runc and CNI plugins in place of kind's source builds, and the kubelet, kubeadm and kubectl of
# build.sh. The component images are imported into its containerd by images.sh afterwards.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      systemd conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz \
      bash ca-certificates curl jq procps containerd runc containernetworking-plugins \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# kind's files after the packages: its containerd config replaces Debian's
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY kubelet kubeadm kubectl /usr/bin/
COPY version /kind/version
ARG PAUSE_VERSION=3.10.2
# true where CAP_SYS_RESOURCE is missing (no negative oom_score_adj), as kind does for rootless nodes
ARG RESTRICT_OOM_SCORE_ADJ=false
RUN chmod 0755 /usr/local/bin/* /kind /kind/bin /kind/bin/* /usr/bin/kubelet /usr/bin/kubeadm /usr/bin/kubectl \
 && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
      /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
 && ln -sf /usr/lib/systemd/systemd /sbin/init \
 && ln -sf /usr/bin/containerd /usr/local/bin/containerd \
 && mkdir -p /opt/cni /etc/kubernetes/manifests && ln -sfn /usr/lib/cni /opt/cni/bin \
 && sed -i -e "s#registry.k8s.io/pause:[0-9.]*#registry.k8s.io/pause:${PAUSE_VERSION}#" \
      -e "s/restrict_oom_score_adj = false/restrict_oom_score_adj = ${RESTRICT_OOM_SCORE_ADJ}/" /etc/containerd/config.toml \
 && ctr oci spec \
      | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
 && systemctl mask systemd-binfmt.service
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
