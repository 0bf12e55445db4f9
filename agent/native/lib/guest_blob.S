/* The guest program (vmguest/, linked at GUEST_CODE) embedded as a flat binary. */
	.section .rodata
	.balign 16
	.globl guest_blob_start
	.globl guest_blob_end
guest_blob_start:
	.incbin GUEST_BIN
guest_blob_end:
	.section .note.GNU-stack, "", @progbits
