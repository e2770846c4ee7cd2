import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The three demo datasets, written once per test session at a reduced size (same formats, same readers)."""
    d = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setattr(demo, "TRAIN_PER_CLASS", {"demo_kinetics": 6, "demo_ssv2": 6, "demo_imagenet": 8})
    mp.setattr(demo, "VAL_PER_CLASS", 3)
    demo.prepare(str(d))
    mp.undo()
    return str(d)


# The fast lane, `python -m pytest -q -m fast tests`: an edit-run loop under two minutes on 2 cores that runs
# code of every source file; the full suite is CI's. Listed here, by file and test name (every parameter),
# so the lane is read in one place.
FAST = {
    "test_bench.py": ["test_data_section"],
    "test_bench_listing.py": ["test_listing_bench_at_a_thousandth_of_the_size"],
    "test_checkpoints.py": ["test_official_pyth", "test_load_errors", "test_own_checkpoint_roundtrip",
                            "test_a_hub_name_that_does_not_load_is_one_line", "test_a_normalisation_not_known_is_said",
                            "test_without_safetensors_both_weights_files_read_the_torch_one",
                            "test_sharded_weights_read_all_their_shards", "test_video_weights_keep_their_attention"],
    "test_data.py": ["test_schedule_round_robin_and_weighted", "test_grad_accum_micro_batches_share_a_dataset",
                     "test_kinetics_indices_hand_computed", "test_segment_indices_hand_computed",
                     "test_views_override_and_single_file_views", "test_mixup_targets_sum_to_one_and_match_lambda",
                     "test_one_process_reads_the_pinned_keys", "test_ddp_ranks_read_slices_of_the_one_process_stream",
                     "test_a_resume_with_another_world_size_reads_on_where_the_run_stopped",
                     "test_each_jpeg_crop_is_decoded_as_if_it_were_alone",
                     "test_a_batch_loses_its_dropped_samples_and_one_that_loses_all_is_one_blank_clip",
                     "test_test_views_of_a_lying_header_follow_the_test_rule_on_the_true_length",
                     "test_whole_number_weights_give_each_dataset_exactly_its_steps"],
    "test_demo.py": ["test_unknown_demo_name_is_refused"],
    "test_eval.py": ["test_not_a_checkpoint_is_one_line",
                     "test_evaluation_and_failure_counts_need_no_float64_and_keep_repeated_names_apart",
                     "test_fixed_subset_is_evenly_spaced_and_the_same_every_time"],
    "test_loaders.py": ["test_a_name_that_is_not_utf8_prints", "test_a_damaged_quarantine_list_is_said_not_a_traceback",
                        "test_every_exit_is_said"],
    "test_faults.py": ["test_log_jsonl_refused_stops_in_one_line_after_a_checkpoint",
                       "test_a_file_system_that_cannot_sync_a_folder_still_saves",
                       "test_a_file_system_that_will_not_say_its_free_space_still_fails_in_one_line",
                       "test_resume_is_accepted_where_a_whole_temporary_file_is_the_only_checkpoint",
                       "test_a_folder_that_cannot_be_synced_after_load_finished_a_save_says_so"],
    "test_export.py": ["test_the_key_tables_read_both_ways", "test_a_model_without_qkv_bias_exports",
                       "test_an_image_head_exports_as_a_one_frame_model_with_the_imagenet_test_crop"],
    "test_fork.py": ["test_your_own_dataset_trains_and_tests_with_kinetics_sampling",
                     "test_change_the_mix_and_see_each_datasets_epochs_before_training",
                     "test_a_new_attention_type_trains_and_is_counted",
                     "test_the_readme_linear_probe_runs_on_features_py_output"],
    "test_kinetics.py": ["test_listings_carry_the_youtube_id_of_each_clip",
                         "test_the_guard_counts_and_leaves_out_validation_videos_of_any_version",
                         "test_k710_merges_renamed_classes_keeps_splits_apart_and_each_video_once",
                         "test_a_version_is_tested_through_its_rows_of_the_k710_head",
                         "test_k710_trains_one_head_and_tests_each_version_on_its_rows", "test_bad_input_is_one_line",
                         "test_the_guard_leaves_out_every_video_a_validation_list_names_on_disk_or_not",
                         "test_the_versions_of_a_k710_listing_saved_before_it_recorded_them"],
    "test_layouts.py": ["test_custom_csv_and_folders", "test_dataset_errors_say_where_and_what",
                        "test_a_listing_of_another_folder_never_replaces_a_runs_listing",
                        "test_a_listings_problems_are_said_once_a_process_listed_or_from_the_cache",
                        "test_a_listing_saved_before_the_folder_was_in_its_name_is_kept",
                        "test_a_repeated_class_name_keeps_its_labels_or_is_one_line_of_error",
                        "test_the_guard_leaves_out_the_validation_videos_it_counts",
                        "test_a_guarded_listing_is_saved_once_and_read_by_the_others",
                        "test_a_listing_saved_without_ids_reads_them_from_its_paths"],
    "test_model.py": ["test_each_attention_type_gives_its_pinned_logits", "test_state_dict_keys_in_their_order",
                      "test_flops_are_the_pinned_counts", "test_sdpa_matches_reference_attention",
                      "test_space_only_is_per_frame_vit_averaged", "test_head_isolation_with_adamw"],
    "test_prepare_videos.py": ["test_missing_folder_one_line"],
    "test_runtime.py": ["test_published_peak_by_device_name",
                        "test_step_values_are_read_one_step_late_unless_all_are_asked_for",
                        "test_a_cadence_in_minutes_is_due_when_the_clock_passes_a_multiple",
                        "test_shm_too_small_for_the_batches_kept_there_is_one_line_with_the_fix"],
    "test_selfcheck.py": ["test_gradient_error_and_cosine_report_the_worst_parameter",
                          "test_nan_gradient_from_a_backend_fails_and_names_the_rows",
                          "test_cpu_launch_count_takes_each_kernel_once_and_no_view_allocation_or_decomposition",
                          "test_gpu_busy_time_is_the_union_of_kernels_within_the_steps",
                          "test_readme_row_from_a_runs_json",
                          "test_a_bf16_step_whose_gradients_are_twice_too_large_fails_its_row",
                          "test_a_compiled_step_whose_gradients_are_twice_too_large_fails_its_row",
                          "test_a_profiled_window_cut_short_by_the_runs_end_counts_only_whole_steps"],
    "test_train.py": ["test_bad_arguments_fail_fast", "test_a_hub_name_without_huggingface_hub_fails_before_any_work",
                      "test_attention_with_init_is_the_flags_for_a_vit_and_the_weights_own_for_video",
                      "test_help_shows_the_values_of_the_recipe_the_command_would_run",
                      "test_every_per_dataset_flag_reads_one_value_one_per_dataset_or_some_by_name",
                      "test_a_fork_that_changes_one_side_of_the_schedule_stops_at_the_first_step",
                      "test_lr_schedule", "test_epochs_set_the_weights_and_the_steps",
                      "test_save_and_eval_cadence_is_steps_or_minutes",
                      "test_a_steps_loss_is_read_after_the_next_step_is_queued_and_before_each_save",
                      "test_flags_that_slipped_past_the_checks_are_one_line_before_any_listing"],
    "test_video.py": ["test_read_video_is_frame_exact", "test_read_video_past_end_and_bad_files",
                      "test_load_image_modes", "test_pyav_decodes_from_the_keyframe_before_each_frame",
                      "test_a_packet_the_decoder_rejects_changes_no_later_answer",
                      "test_pyav_seeks_land_on_the_keyframe_itself", "test_rotation_as_opencv_shows_it",
                      "test_a_cut_numbers_only_the_frames_a_decode_from_the_start_shows",
                      "test_any_file_reads_or_is_a_read_error",
                      "test_a_video_is_listed_once_per_process_and_an_unseekable_one_is_not_seeked_again",
                      "test_a_seam_where_the_decoder_drops_pictures_numbers_what_it_shows_whatever_was_read_before",
                      "test_the_cache_bound_counts_the_memory_its_entries_take"],
}


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: the fast lane (tests/conftest.py FAST), under two minutes")


def pytest_collection_modifyitems(config, items):
    modules = {}  # file -> its module, to check every FAST name against
    for item in items:
        file = os.path.basename(item.path)
        modules[file] = item.module
        if item.originalname in FAST.get(file, ()):
            item.add_marker(pytest.mark.fast)
    missing = [f"{f}::{n}" for f, m in modules.items() for n in FAST.get(f, ()) if not hasattr(m, n)]
    if missing:  # a renamed test would leave the lane silently
        raise pytest.UsageError(f"tests/conftest.py FAST names tests that do not exist: {', '.join(missing)}")
