/* SPDX-License-Identifier: GPL-2.0 */
/* A small JSON writer: nested objects/arrays into a growing buffer, commas handled for you. */
#ifndef PMUFARM_JSON_H
#define PMUFARM_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSON_MAX_DEPTH 32

struct json {
	char *buf;
	size_t len, cap;
	int depth;
	bool first[JSON_MAX_DEPTH];   /* no member written yet at this depth */
	bool failed;                  /* out of memory or nesting too deep */
};

void json_init(struct json *j);
void json_free(struct json *j);
/* `key` names the member inside an object; pass NULL inside arrays and at the top level. */
void json_obj_begin(struct json *j, const char *key);
void json_obj_end(struct json *j);
void json_arr_begin(struct json *j, const char *key);
void json_arr_end(struct json *j);
void json_u64(struct json *j, const char *key, uint64_t v);
void json_i64(struct json *j, const char *key, int64_t v);
void json_str(struct json *j, const char *key, const char *s);
void json_bool(struct json *j, const char *key, bool v);
void json_null(struct json *j, const char *key);
/* A vector/errno-like value: null when negative (no exception taken / unknown). */
void json_opt_i64(struct json *j, const char *key, int64_t v);
/* Splice another writer's finished top-level value in as a member. */
void json_value(struct json *j, const char *key, const struct json *value);

#endif
