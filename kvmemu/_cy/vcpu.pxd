# Declarations of a vCPU and its access loop (vcpu.pyx).

from libc.stdint cimport uint8_t, uint64_t

cdef enum AccessStatus:
    ACCESS_TRANSLATED = 0
    ACCESS_MEMORY_FAULT = 1
    ACCESS_MMIO = 2
    ACCESS_UNSETTLED = 3
    ACCESS_FAILED = 4
    ACCESS_GUEST_EXCEPTION = 5

cdef class VCPUState:
    cdef readonly Memslots memslots
    cdef readonly TdpMmu mmu
    cdef readonly bint ept, tdx, snp, sw_protected, has_private_mem, nx_huge_pages
    cdef bint confidential                  # tdx or snp: the hardware checks frames
    cdef readonly uint64_t direct_bits_gfn
    cdef readonly int levels
    cdef readonly uint64_t max_gfn          # kvm_mmu_max_gfn()
    cdef readonly bint pml_on               # enable_pml for this VM (cpu_dirty_log_size)
    cdef PmlLog pml                         # the vCPU's page-modification log
    cdef uint64_t counters[6]               # indexed by PfStat
    cdef public int exit_reason
    cdef uint64_t mf_flags, mf_gpa, mf_size # run.memory_fault
    cdef uint64_t mmio_gpa                  # run.mmio
    cdef bint mmio_is_write
    cdef public uint64_t mmio_gfn, mmio_gen # the vCPU's MMIO cache
    cdef object hook                        # stage_hook (set by that property only)
    cdef long hooked                        # hook is not None, read without the GIL
    cdef object run_hypercall               # run.hypercall (kvmemu._hypercall.HypercallRun)
    cdef bint hypercall_pending             # run_hypercall.pending is not None (for quiet)
    cdef public unsigned int vcpu_id        # what kvm_page_fault reports
    cdef public uint64_t rip
    cdef public uint64_t ext_exit_qual      # a TD exit's extended exit qualification (RDX)
    cdef public bint interrupt_pending      # kvm_vcpu_has_events (the API sets it)
    cdef public object slow_access          # the API's VCPU.access, for what needs Python
    cdef public object slow_access_many     # and its VCPU.access_many
    cdef uint64_t vc_gpa                    # the page of the last #VC
    cdef SlotTable srcu                     # the memslots an exit's handling reads
    # Faults access_many's GIL-free loop handled itself (a diagnostic of this core, not
    # KVM state: neither exported nor cloned).
    cdef uint64_t loop_fault_count
    cdef public Mutex mutex                 # vcpu->mutex (the API's VCPU owns it)
    cdef int handle_exit(self, int kind, uint64_t gpa,
                         uint64_t value) except CORE_RETURN_PY_EXCEPTION
    cdef int stage(self, str name, FaultRecord* f) except -1
    cdef bint quiet(self) noexcept
    cdef PmlLog* active_pml(self) noexcept
    cdef void leave_guest(self) noexcept
    cdef void confidential_check(self, const PagingConfig* c, uint64_t gpa, uint64_t flags,
                                 Outcome* out) noexcept nogil
    cdef int vcpu_run(self, uint64_t gpa, uint64_t flags, int limit, Outcome* out,
                      int* err) except -1
    cpdef object access(self, uint64_t gpa, uint64_t flags, int limit)
    cdef object outcome_of(self, int status, const Outcome* out, int err, uint64_t gpa,
                           str where, int limit)
    cdef object batch_into(self, const uint64_t[::1] gpas, uint64_t f, object out)
    cdef object batch(self, const uint64_t[::1] gpas, object flags, int limit, object hpa_arr,
                      object level_arr, uint64_t* hpa, uint8_t* level)
    cdef object run_batch(self, const uint64_t[::1] gpas, const uint8_t[::1] fl, uint64_t f,
                          bint per_element, object hpa_arr, object level_arr, uint64_t* hpa,
                          uint8_t* level, int limit)
