//! Where the data plane lives while no daemon runs: every map and every XDP
//! link of an instance is pinned under `/sys/fs/bpf/forwarder/<instance>/<layout>/`.
//!
//! The `<layout>` directory name is a fingerprint of the kernel/user contract
//! (map names, types, key and value sizes, creation flags, the shared struct sizes and
//! [`LAYOUT_VERSION`]). A daemon only adopts pins carrying its own
//! fingerprint: an upgrade that changed the layout is refused instead of
//! reading old maps through new types.

use std::path::{Path, PathBuf};

use anyhow::Context;
use forwarder_common::reason::ReasonCounter;
use forwarder_common::{
    BackendKey, BackendKey6, BackendRewrite, ClientKey, ClientKey6, FlowCounter, REASON_COUNT,
    RelayConfig, Rewrite, Rewrite6,
};

/// Bump whenever the meaning of a map's bytes changes without its size changing.
pub const LAYOUT_VERSION: u32 = 1;

/// The bpffs mount the pins live on.
pub const BPFFS: &str = "/sys/fs/bpf";

/// `statfs` magic of a BPF filesystem (linux/magic.h).
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// The pin directories of one instance.
#[derive(Clone, Debug)]
pub struct PinDir {
    /// `/sys/fs/bpf/forwarder/<instance>`
    pub instance_dir: PathBuf,
    /// `<instance_dir>/<layout>`: holds the maps and links.
    pub dir: PathBuf,
    pub layout: String,
}

/// A map's shape as far as the contract goes.
pub struct MapShape<'a> {
    pub name: &'a str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Creation flags (BPF_F_NO_PREALLOC...): a pinned map keeps the ones
    /// it was made with, so a change needs a new layout, never an adoption.
    pub map_flags: u32,
}

/// FNV-1a: a fingerprint that stays the same across Rust releases (std's
/// hasher does not promise that) and needs no crate.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The layout fingerprint for these maps, e.g. `layout-1-3f9a0c2e11d4b7a5`.
pub fn layout_id(maps: &mut [MapShape<'_>]) -> String {
    maps.sort_by(|a, b| a.name.cmp(b.name));
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for size in [
        size_of::<ClientKey>(),
        size_of::<BackendKey>(),
        size_of::<Rewrite>(),
        size_of::<BackendRewrite>(),
        size_of::<FlowCounter>(),
        size_of::<ReasonCounter>(),
        size_of::<RelayConfig>(),
        size_of::<ClientKey6>(),
        size_of::<BackendKey6>(),
        size_of::<Rewrite6>(),
        // The reason counter array is sized by it: an old pinned one is shorter.
        REASON_COUNT as usize,
    ] {
        hash = fnv1a(hash, &(size as u64).to_le_bytes());
    }
    for map in maps.iter() {
        hash = fnv1a(hash, map.name.as_bytes());
        for field in [map.map_type, map.key_size, map.value_size] {
            hash = fnv1a(hash, &field.to_le_bytes());
        }
        // Only when set: layouts from before flags counted stay as they were.
        if map.map_flags != 0 {
            hash = fnv1a(hash, b"flags");
            hash = fnv1a(hash, &map.map_flags.to_le_bytes());
        }
    }
    format!("layout-{LAYOUT_VERSION}-{hash:016x}")
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (minimal hosts
/// and containers), so pins have somewhere to live.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new(BPFFS);
    if let Ok(stat) = nix::sys::statfs::statfs(root)
        && stat.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    // Mounting needs CAP_SYS_ADMIN, which the packaged unit does not grant:
    // there systemd has mounted bpffs at boot, and this only runs where it did not.
    let fix = format!(
        "mount it yourself (`mount -t bpf bpf {BPFFS}`, or `bpf {BPFFS} bpf defaults 0 0` in /etc/fstab) and restart"
    );
    std::fs::create_dir_all(root)
        .with_context(|| format!("no bpffs on {BPFFS} and creating the folder failed: {fix}"))?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("no bpffs on {BPFFS} and mounting it failed: {fix}"))?;
    Ok(())
}

impl PinDir {
    pub fn new(instance: &str, layout: String) -> Self {
        let instance_dir = Path::new(BPFFS).join("forwarder").join(instance);
        Self {
            dir: instance_dir.join(&layout),
            instance_dir,
            layout,
        }
    }

    /// Creates the pin directory, refusing when the instance's pins carry
    /// another layout. Returns whether a data plane was already pinned.
    pub fn prepare(&self, instance: &str) -> anyhow::Result<bool> {
        ensure_bpffs()?;
        for layout in self.existing_layouts()? {
            if layout != self.layout {
                return Err(super::Misconfigured(format!(
                    "instance {instance:?} has a data plane pinned with map layout {layout}, but this \
                     forwarder uses {}: its maps cannot be adopted. Either run the forwarder version \
                     that pinned them, or drop the old data plane (established flows stop until \
                     clients send again) with `forwarder detach --instance {instance}` and start again",
                    self.layout
                ))
                .into());
            }
        }
        let adopting = self.dir.is_dir() && std::fs::read_dir(&self.dir)?.next().is_some();
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        Ok(adopting)
    }

    fn existing_layouts(&self) -> anyhow::Result<Vec<String>> {
        match std::fs::read_dir(&self.instance_dir) {
            Ok(entries) => Ok(entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => {
                Err(error).with_context(|| format!("reading {}", self.instance_dir.display()))
            }
        }
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("map-{}", name.replace('.', "%2e")))
    }

    /// A link pin's name records its attach mode, which the kernel does not
    /// tell back through the link. bpffs refuses names with a dot, which
    /// interface names may have (VLANs: eth0.100), hence the escape.
    pub fn link_path(&self, interface: &str, mode: &str) -> PathBuf {
        self.dir.join(format!(
            "link-{mode}-{}",
            interface.replace('%', "%25").replace('.', "%2e")
        ))
    }

    /// Removes this layout's pins and folder (and the instance folder when
    /// that leaves it empty): what a failed first start built. Best effort:
    /// it runs on the way out of an error that is already being reported.
    pub fn remove_fresh(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut pins: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
            // Links first, so the program leaves the interfaces before its maps go.
            pins.sort_by_key(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("link-"))
            });
            for pin in pins {
                let _ = std::fs::remove_file(pin);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(&self.instance_dir);
    }

    /// The pinned link of `interface`, if any, with its mode.
    pub fn find_link(&self, interface: &str) -> Option<(PathBuf, String)> {
        LINK_MODES
            .iter()
            .map(|mode| (self.link_path(interface, mode), mode.to_string()))
            .find(|(path, _)| path.exists())
    }
}

/// The attach modes a link pin can record.
const LINK_MODES: [&str; 2] = ["native", "skb"];

/// Removes every pin of `instance` whatever its layout: unpinning the links
/// detaches the program, and the maps go once nothing holds them.
/// Returns how many pins were removed.
pub fn remove_instance(instance: &str) -> anyhow::Result<usize> {
    let instance_dir = Path::new(BPFFS).join("forwarder").join(instance);
    let mut removed = 0;
    let Ok(layouts) = std::fs::read_dir(&instance_dir) else {
        return Ok(0);
    };
    for layout in layouts.filter_map(Result::ok) {
        // Links first, so the program stops before its maps go.
        let mut pins: Vec<PathBuf> = std::fs::read_dir(layout.path())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        pins.sort_by_key(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link-"))
        });
        for pin in pins {
            std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            removed += 1;
        }
        std::fs::remove_dir(layout.path())?;
    }
    std::fs::remove_dir(&instance_dir)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str, value_size: u32) -> MapShape<'_> {
        MapShape {
            name,
            map_type: 1,
            key_size: 12,
            value_size,
            map_flags: 0,
        }
    }

    #[test]
    fn pin_names_have_no_dots() {
        let pins = PinDir::new("t1", "layout-1-0".into());
        let link = pins.link_path("eth0.100", "native");
        assert_eq!(link.file_name().unwrap(), "link-native-eth0%2e100");
        assert!(
            !pins
                .map_path(".rodata")
                .file_name()
                .unwrap()
                .to_string_lossy()
                .contains('.')
        );
    }

    #[test]
    fn layout_changes_with_any_map_shape_but_not_with_order() {
        let a = layout_id(&mut [shape("A", 40), shape("B", 16)]);
        assert_eq!(a, layout_id(&mut [shape("B", 16), shape("A", 40)]));
        assert_ne!(a, layout_id(&mut [shape("A", 48), shape("B", 16)]));
        assert_ne!(a, layout_id(&mut [shape("A", 40), shape("C", 16)]));
        assert!(a.starts_with(&format!("layout-{LAYOUT_VERSION}-")));
    }

    #[test]
    fn layout_changes_with_map_flags() {
        let a = layout_id(&mut [shape("A", 40), shape("B", 16)]);
        let no_prealloc = MapShape {
            map_flags: 1,
            ..shape("A", 40)
        };
        assert_ne!(a, layout_id(&mut [no_prealloc, shape("B", 16)]));
    }
}
