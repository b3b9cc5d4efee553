//! GPU slots: which device an instance runs on, and which instances may share one.
//!
//! `run --gpus N` gives N devices, each with `capacity` bytes of memory (`--gpu-memory`, what the
//! backend reports, or a conservative default; `None` when no device memory is at stake, as on
//! the CPU backend). An instance asking for whole GPUs (`resources: {gpu: 1}`) takes that many
//! idle devices (at most N, as a stage asking for more CPU slots than exist gets all of them).
//! One asking for a fraction (`gpu: 0.25`) shares a device with other fractional instances while
//! their fractions sum to at most 1 and their memory estimates ([`crate::stage_kind::StageKind::device_memory`])
//! to at most the device's memory. It goes to the least loaded device that fits (idle devices
//! first: a second GPU is better used than shared). An instance whose estimate alone exceeds a
//! device runs on an idle device by itself, rather than never: the estimate is an estimate.
//!
//! Pure bookkeeping: the executor asks [`GpuPool::acquire`] in its dispatch loop and hands the
//! [`Grant`] back with [`GpuPool::release`] when the instance ends.

use crate::stage_kind::{Catalog, GpuShare, Resources};
use crate::sweep::Instance;

/// What one instance asks of the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    pub share: GpuShare,
    /// Estimated device memory in bytes; `None`: unknown, counted as nothing.
    pub memory: Option<u64>,
}

/// What an instance holds while it runs; `device` is the index it is told to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub device: usize,
    /// Every device held, with the thousandths and bytes taken from it.
    held: Vec<(usize, u32, u64)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Device {
    /// Thousandths of the device in use.
    used: u32,
    /// Estimated bytes in use.
    memory: u64,
    /// Instances on it.
    instances: u32,
}

#[derive(Debug, Clone)]
pub struct GpuPool {
    devices: Vec<Device>,
    capacity: Option<u64>,
}

impl GpuPool {
    pub fn new(devices: u32, capacity: Option<u64>) -> GpuPool {
        GpuPool { devices: vec![Device::default(); devices as usize], capacity }
    }

    /// How many devices the pool has (`--gpus`).
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// The devices `d` would get now (the first is the one it uses), or `None` if it must wait.
    /// A demand of no GPU gets no device.
    pub fn place(&self, d: &Demand) -> Option<Vec<usize>> {
        if d.share.is_none() || self.devices.is_empty() {
            return None;
        }
        if !d.share.is_fraction() {
            let want = (d.share.devices() as usize).min(self.devices.len());
            let idle: Vec<usize> = (0..self.devices.len()).filter(|&i| self.devices[i].instances == 0).take(want).collect();
            return (idle.len() == want).then_some(idle);
        }
        let memory = d.memory.unwrap_or(0);
        let fits = |dev: &Device| {
            let share_fits = dev.used + d.share.thousandths() <= GpuShare::WHOLE;
            let memory_fits = match self.capacity {
                None => true,
                Some(cap) => dev.instances == 0 || dev.memory.saturating_add(memory) <= cap,
            };
            share_fits && memory_fits
        };
        (0..self.devices.len())
            .filter(|&i| fits(&self.devices[i]))
            .min_by_key(|&i| (self.devices[i].used, self.devices[i].memory, i))
            .map(|i| vec![i])
    }

    /// Takes what [`GpuPool::place`] finds, or `None` (nothing changes) if `d` must wait.
    pub fn acquire(&mut self, d: &Demand) -> Option<Grant> {
        let devices = self.place(d)?;
        let (share, memory) = if d.share.is_fraction() { (d.share.thousandths(), d.memory.unwrap_or(0)) } else { (GpuShare::WHOLE, 0) };
        let held: Vec<(usize, u32, u64)> = devices.iter().map(|&i| (i, share, memory)).collect();
        for &(i, s, m) in &held {
            let dev = &mut self.devices[i];
            dev.used += s;
            dev.memory += m;
            dev.instances += 1;
        }
        Some(Grant { device: devices[0], held })
    }

    pub fn release(&mut self, g: Grant) {
        for (i, s, m) in g.held {
            let dev = &mut self.devices[i];
            dev.used -= s;
            dev.memory -= m;
            dev.instances -= 1;
        }
    }
}

/// The GPU demand of every instance: its share, and for a fractional share its kind's memory
/// estimate. Only fractional instances are estimated (whole devices are not shared).
pub fn demands(instances: &[Instance], resources: &[Resources], catalog: &Catalog) -> Vec<Demand> {
    instances
        .iter()
        .zip(resources)
        .enumerate()
        .map(|(i, (inst, res))| {
            let memory = if res.gpu.is_fraction() {
                catalog.get(&inst.kind).and_then(|k| k.device_memory(&inst.params, &|name| crate::sweep::upstream_param(instances, i, name)))
            } else {
                None
            };
            Demand { share: res.gpu, memory }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn frac(t: u32, memory: u64) -> Demand {
        Demand { share: GpuShare::from_thousandths(t), memory: Some(memory) }
    }

    fn whole(n: u32) -> Demand {
        Demand { share: GpuShare::whole(n), memory: None }
    }

    #[test]
    fn four_quarters_fill_one_device_and_a_fifth_waits() {
        let mut p = GpuPool::new(1, None);
        let grants: Vec<Grant> = (0..4).map(|_| p.acquire(&frac(250, 0)).expect("fits")).collect();
        assert!(grants.iter().all(|g| g.device == 0));
        assert_eq!(p.acquire(&frac(250, 0)), None);
        // Thirds: 0.333 * 3 = 0.999 fit, exactly; a fourth does not.
        let mut p = GpuPool::new(1, None);
        for _ in 0..3 {
            p.acquire(&frac(333, 0)).unwrap();
        }
        assert!(p.place(&frac(333, 0)).is_none());
        assert!(p.place(&frac(1, 0)).is_some());
    }

    #[test]
    fn memory_limits_sharing_even_when_shares_fit() {
        let mut p = GpuPool::new(1, Some(8 * GIB));
        let a = p.acquire(&frac(250, 3 * GIB)).unwrap();
        let _b = p.acquire(&frac(250, 3 * GIB)).unwrap();
        // 6 GiB used of 8: another 3 GiB would not fit, a 2 GiB one does.
        assert_eq!(p.place(&frac(250, 3 * GIB)), None);
        assert_eq!(p.place(&frac(250, 2 * GIB)), Some(vec![0]));
        p.release(a);
        assert_eq!(p.place(&frac(250, 3 * GIB)), Some(vec![0]));
    }

    #[test]
    fn an_instance_larger_than_a_device_runs_alone_not_never() {
        let mut p = GpuPool::new(1, Some(4 * GIB));
        let big = p.acquire(&frac(250, 10 * GIB)).expect("an idle device takes it");
        assert_eq!(p.place(&frac(250, 1)), None, "nothing shares with it");
        p.release(big);
        let small = p.acquire(&frac(250, GIB)).unwrap();
        assert_eq!(p.place(&frac(250, 10 * GIB)), None, "it waits for the device to be idle");
        p.release(small);
        assert!(p.place(&frac(250, 10 * GIB)).is_some());
    }

    #[test]
    fn fractions_spread_over_idle_devices_first_then_share_the_least_loaded() {
        let mut p = GpuPool::new(2, Some(16 * GIB));
        let d: Vec<usize> = (0..4).map(|_| p.acquire(&frac(500, GIB)).unwrap().device).collect();
        assert_eq!(d, vec![0, 1, 0, 1]);
        assert_eq!(p.place(&frac(500, GIB)), None);
    }

    #[test]
    fn whole_devices_need_idle_devices_and_are_capped_at_the_pool() {
        let mut p = GpuPool::new(2, Some(GIB));
        let q = p.acquire(&frac(100, 1)).unwrap();
        assert_eq!(q.device, 0);
        // A whole GPU does not share: device 1 is the idle one.
        let w = p.acquire(&whole(1)).unwrap();
        assert_eq!(w.device, 1);
        assert_eq!(p.place(&whole(1)), None);
        assert_eq!(p.place(&frac(100, 1)), Some(vec![0]), "fractions never go to a whole-held device");
        p.release(q);
        p.release(w);
        // Asking for 5 of 2 devices takes both (like CPU slots), instead of waiting forever.
        let all = p.acquire(&whole(5)).unwrap();
        assert_eq!(all.held.len(), 2);
        assert_eq!(p.place(&frac(1, 0)), None);
        p.release(all);
        assert_eq!(p.place(&whole(2)), Some(vec![0, 1]));
    }

    #[test]
    fn no_gpu_and_no_devices_give_no_slot() {
        let p = GpuPool::new(0, None);
        assert_eq!(p.place(&frac(250, 0)), None);
        assert_eq!(GpuPool::new(1, None).place(&Demand::default()), None);
    }

    #[test]
    fn release_restores_the_pool_exactly() {
        let mut p = GpuPool::new(3, Some(10 * GIB));
        let demands = [frac(300, GIB), whole(1), frac(700, 5 * GIB), frac(250, 2 * GIB), whole(1)];
        let grants: Vec<Grant> = demands.iter().filter_map(|d| p.acquire(d)).collect();
        assert!(grants.len() >= 4);
        for g in grants {
            p.release(g);
        }
        assert!(p.devices.iter().all(|d| d.used == 0 && d.memory == 0 && d.instances == 0));
    }
}
