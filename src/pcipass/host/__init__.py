"""Host: sysfs inventory, IOMMU groups, verdicts, claim/release with a journal, boot-time hiding, consumer config.

The packages follow the flow, and each imports only from those before it:

    model        sysfs -> Host, PciDevice, IommuGroup; pci.ids names; usage (disks,
                 interfaces); holders (processes, libvirt domains)
    verdict      judge(): the model -> a Verdict with reasons
    transaction  claim/release/recover with the journal and owner; boot-time hiding
    present      the verbs' command lines, their JSON documents, consumer config

Beside the flow: fixtures (synthetic trees, snapshots: they read the model) and speed
(fan-out over CPUs, which imports nothing of pcipass).
"""
