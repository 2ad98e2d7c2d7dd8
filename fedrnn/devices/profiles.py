"""Device profiles and networks, each value grounded in a published measurement or marked as an assumption.

Where the numbers come from
---------------------------
CPU speed is Geekbench 6 single-core score relative to an assumed score for one core of this
host (:data:`HOST_GB6_SINGLE`). Single-core because the host throughput is measured with one
torch thread: on this shared 2-vCPU host a 2-thread train step of the default model was slower
than a 1-thread one (73 vs 133 samples/s, batch 32, 256 tokens), so one thread is the stable
unit. Multi-core gains on the devices are therefore not modelled (device speeds are
conservative). Where a device has no Geekbench 6 result, a documented bridge is used (Pi 4B,
measured under both Geekbench 5 and 6 by the same reviewer; or clock scaling of the same core).
Every profile, network and default below cites its source; values marked *assumption* have no
measured public source and are the module's stated choice.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30
MBPS = 1e6



@dataclass(frozen=True)
class Network:
    name: str
    down_bps: float
    up_bps: float
    latency_s: float
    source: str


NETWORKS: dict[str, Network] = {
    "wifi": Network(
        "wifi",
        down_bps=84.33 * MBPS,
        up_bps=44.10 * MBPS,
        latency_s=0.010,
        source="Ookla Speedtest Global Index, Aug 2020: global fixed-broadband average 84.33 Mbps down / "
        "44.10 Mbps up (https://www.speedtest.net/global-index, reported by telecomtalk.info 2020-09-16); "
        "Ookla 2022 global fixed-broadband median latency 10 ms (reported by tele.net.in). A device's own "
        "Wi-Fi radio can cap this (DeviceProfile.wifi_cap_bps).",
    ),
    "4g": Network(
        "4g",
        down_bps=17.4 * MBPS,
        up_bps=6.0 * MBPS,
        latency_s=0.060,
        source="OpenSignal 'State of LTE' Nov 2016: global average LTE download 17.4 Mbps "
        "(https://opensignal.com/blog, State of LTE 11-2016); OpenSignal US report Jul 2019: upload "
        "4.9-7.3 Mbps across operators (6.0 used); OpenSignal 'State of Mobile Networks: USA' Aug 2018: "
        "4G latency 57-64.7 ms (60 ms used).",
    ),
    "3g": Network(
        "3g",
        down_bps=3.8 * MBPS,
        up_bps=1.0 * MBPS,
        latency_s=0.150,
        source="OpenSignal 'State of Mobile Networks: USA' Aug 2018: 3G download 4.6 Mbps (T-Mobile) and "
        "3.0 Mbps (AT&T), mean 3.8 used; OpenSignal/FierceWireless 2014: HSPA latency around 150 ms. "
        "Upload 1.0 Mbps is an assumption (no measured public average found).",
    ),
}


# --------------------------------------------------------------------------------------------
# Device profiles
# --------------------------------------------------------------------------------------------

HOST_GB6_SINGLE = 2845.0
"""Assumed Geekbench 6 single-core score of one core of this host (AMD EPYC, Zen 5, 2 vCPUs under
KVM). Geekbench cannot run offline here, so the anchor is the closest published Zen 5 result from
the same dataset as the boards: Framework 13 with Ryzen AI 5 340 (Zen 5), 2845
(https://github.com/geerlingguy/sbc-reviews/issues/90). If the host is really slower, every device
speed is underestimated by the same factor (all compute times scale together)."""

_GB5_TO_GB6_SINGLE = 289.0 / 271.0
"""Bridge for devices with only Geekbench 5 results: Raspberry Pi 4B scored 271 (GB5) and 289 (GB6)
single-core in Jeff Geerling's tests (https://github.com/geerlingguy/sbc-reviews/issues/4)."""

_OS_RESERVE_BYTES = 100 * MIB
"""Assumption: a headless Linux image (Raspberry Pi OS Lite / L4T) keeps about 100 MiB for itself."""
_TORCH_RUNTIME_BYTES = 323 * MIB
"""Measured on this host: resident memory (/proc/self/status VmRSS) of a Python process after
``import torch`` and fedrnn (225 MiB) and one training step of a tiny SentimentRNN, which loads the
CPU kernels (323 MiB); the framework's fixed cost before any model tensor."""
_ANDROID_BACKGROUND_FRACTION = 0.25
"""Assumption: a background training job on Android may use a quarter of the phone's RAM before the
low-memory killer reclaims it (Android publishes no fixed limit for native memory)."""


def _linux_usable(total_bytes: int) -> int:
    return total_bytes - _OS_RESERVE_BYTES - _TORCH_RUNTIME_BYTES


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu: str
    gb6_single: float
    ram_total_bytes: int
    ram_usable_bytes: int
    network: str
    availability: str
    dropout_prob: float
    wifi_cap_bps: float | None
    source: str

    @property
    def relative_speed(self) -> float:
        """Training speed relative to one core of this host (Geekbench 6 single-core ratio)."""
        return self.gb6_single / HOST_GB6_SINGLE


_DROPOUT_SOURCE = (
    "Phone dropout: Bonawitz et al., 'Towards Federated Learning at Scale: System Design', SysML 2019 "
    "(arXiv:1902.01046) report 6-10% of participating phones dropping out of a round; mains-powered "
    "boards on Wi-Fi use an assumed 2%."
)

PROFILES: dict[str, DeviceProfile] = {
    "rpi-zero2w": DeviceProfile(
        name="rpi-zero2w",
        cpu="4x Cortex-A53 @ 1.0 GHz (RP3A0)",
        gb6_single=108.0 * _GB5_TO_GB6_SINGLE * (1.0 / 1.4),
        ram_total_bytes=512 * MIB,
        ram_usable_bytes=_linux_usable(512 * MIB),
        network="wifi",
        availability="churn",
        dropout_prob=0.05,
        wifi_cap_bps=None,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-zero-2-w/ (1 GHz quad A53, 512 MB, "
        "2.4 GHz 802.11n). Speed: the Pi 3B+ result (same Cortex-A53, 1.4 GHz; GB5 108) scaled by clock "
        "1.0/1.4 and bridged to GB6. Battery/solar IoT use: churn availability and 5% dropout are assumptions.",
    ),
    "rpi3b+": DeviceProfile(
        name="rpi3b+",
        cpu="4x Cortex-A53 @ 1.4 GHz (BCM2837B0)",
        gb6_single=108.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=1 * GIB,
        ram_usable_bytes=_linux_usable(1 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=24.5 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-3-model-b-plus/ (1 GB). Geekbench 5 "
        "108 single / 303 multi and iperf3 Wi-Fi 24.5 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/16 (web/data/results.yml). " + _DROPOUT_SOURCE,
    ),
    "rpi4": DeviceProfile(
        name="rpi4",
        cpu="4x Cortex-A72 @ 1.8 GHz (BCM2711)",
        gb6_single=289.0,
        ram_total_bytes=2 * GIB,
        ram_usable_bytes=_linux_usable(2 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=108.0 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-4-model-b/specifications/ (2 GB "
        "variant). Geekbench 6 289 single / 653 multi, iperf3 Wi-Fi 108 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/4. " + _DROPOUT_SOURCE,
    ),
    "rpi5": DeviceProfile(
        name="rpi5",
        cpu="4x Cortex-A76 @ 2.4 GHz (BCM2712)",
        gb6_single=904.0,
        ram_total_bytes=4 * GIB,
        ram_usable_bytes=_linux_usable(4 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=186.0 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-5/ (4 GB variant). Geekbench 6 904 "
        "single / 2164 multi, iperf3 Wi-Fi 186 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/21. " + _DROPOUT_SOURCE,
    ),
    "jetson-nano": DeviceProfile(
        name="jetson-nano",
        cpu="4x Cortex-A57 @ 1.43 GHz (Tegra X1), CPU only",
        gb6_single=289.0 * 5060.0 / 5700.0,
        ram_total_bytes=4 * GIB,
        ram_usable_bytes=4 * GIB - 1 * GIB - _TORCH_RUNTIME_BYTES,
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=None,
        source="Specs: https://developer.nvidia.com/embedded/jetson-nano-developer-kit (quad A57 1.43 GHz, "
        "4 GB shared with the GPU; 1 GiB assumed for the L4T desktop). Speed: sbc-bench 7-zip MIPS, Jetson "
        "Nano 5060 (http://ix.io/1I4j) vs Raspberry Pi 4B @1.8 GHz arm64 5760 and 5640 (mean 5700), "
        "https://github.com/ThomasKaiser/sbc-bench/blob/master/Results.md, applied to the Pi 4B GB6 score. "
        + _DROPOUT_SOURCE,
    ),
    "phone-low": DeviceProfile(
        name="phone-low",
        cpu="Helio G85: 2x Cortex-A75 @ 2.0 GHz + 6x Cortex-A55 @ 1.8 GHz (e.g. Redmi Note 9)",
        gb6_single=352.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=3 * GIB,
        ram_usable_bytes=int(3 * GIB * _ANDROID_BACKGROUND_FRACTION),
        network="4g",
        availability="diurnal",
        dropout_prob=0.10,
        wifi_cap_bps=None,
        source="Helio G85 has the Helio G80's CPU (computerbase.de 2020-05, MediaTek Helio G85); Helio G80 "
        "Geekbench 5 352 single / 1322 multi (purepc.pl, 2020), bridged to GB6. 3 GB Redmi Note 9 variant. "
        + _DROPOUT_SOURCE,
    ),
    "phone-mid": DeviceProfile(
        name="phone-mid",
        cpu="Exynos 1380: 4x Cortex-A78 @ 2.4 GHz + 4x Cortex-A55 @ 2.0 GHz (Galaxy A54 5G)",
        gb6_single=776.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=6 * GIB,
        ram_usable_bytes=int(6 * GIB * _ANDROID_BACKGROUND_FRACTION),
        network="4g",
        availability="diurnal",
        dropout_prob=0.06,
        wifi_cap_bps=None,
        source="Exynos 1380 Geekbench 5 776 single / 2599 multi (Geekbench listing of the Galaxy A54, "
        "https://www.nextpit.com/samsung-galaxy-a54-exynos-processor), bridged to GB6; 6 GB variant. "
        + _DROPOUT_SOURCE,
    ),
}
