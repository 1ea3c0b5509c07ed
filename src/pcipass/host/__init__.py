"""Host: sysfs inventory, IOMMU groups, verdicts, claim/release with a journal, boot-time hiding, consumer config."""
