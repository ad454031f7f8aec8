// SPDX-License-Identifier: GPL-2.0-only
/* Never loaded: exists so that the BTF of a built object describes every struct of trustdb.h
 * (the programs inline their uses away). tests/engine/test_abi.py compares trustdb/abi.py
 * with this BTF, field by field (Tetragon's alignchecker). */
#include "vmlinux.h"
#include "trustdb.h"

struct td_inode_key td_abi_inode_key;
struct td_event td_abi_event;
struct td_task td_abi_task;
struct td_config td_abi_config;
struct td_first_seen_group td_abi_first_seen_group;
enum td_hook td_abi_hook;
enum td_verdict td_abi_verdict;
enum td_mode td_abi_mode;
enum td_backend td_abi_backend;
enum td_reason td_abi_reason;
enum td_protect td_abi_protect;
enum td_program_flag td_abi_program_flag;
enum td_mode_rule td_abi_mode_rule;

char LICENSE[] __attribute__((section("license"), used)) = "GPL";
